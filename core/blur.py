"""Selective blur: a light Gaussian blended in only where the mask says so.

``gaussian`` mode blends ``mask * strength`` of the blurred copy. ``target``
mode (preferred) blends per pixel only as much as brings the local
high-frequency energy down to ``target`` on the fixed scale of the map: with
``E`` the energy of the frame and ``E_b`` that of the blurred copy, a blend
``a`` has at most ``(1 - a) E + a E_b``, so ``a = (E - target) / (E - E_b)``
(clipped to 0..1, times the mask). Detail already below the target is left
alone; ``sigma`` is the most blur any pixel gets.

Pixels where the blend weight is 0 are byte-identical to the input; all work
happens inside the bounding box of the mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from core.frequency import WORK_SCALE, AnalysisParams, expand, raw_energy
from core.mask import support_box

BlurMode = Literal["gaussian", "target"]

# Context kept around the mask's box so that filters see real neighbours there.
_MARGIN = 24


@dataclass(frozen=True)
class BlurParams:
    """sigma : Gaussian sigma of the blurred copy in output pixels (the most blur).
    strength : largest share of the blurred copy a pixel receives.
    mode : ``gaussian`` or ``target`` (see the module docstring).
    target : energy (fixed scale, 0..1) that ``target`` mode brings sinks down to.
    """

    mode: BlurMode = "target"
    sigma: float = 1.2
    strength: float = 1.0
    target: float = 0.08

    def __post_init__(self) -> None:
        if self.mode not in ("gaussian", "target"):
            raise ValueError(f"mode must be 'gaussian' or 'target', got {self.mode!r}")
        if not 0.3 <= self.sigma <= 10.0:
            raise ValueError(f"sigma must be in 0.3..10, got {self.sigma}")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be in 0..1, got {self.strength}")
        if not 0.0 <= self.target <= 1.0:
            raise ValueError(f"target must be in 0..1, got {self.target}")


def gaussian(image: np.ndarray, *, sigma: float) -> np.ndarray:
    """The lightly blurred copy of an RGB ``uint8`` image (kernel +-3 sigma)."""
    size = 2 * int(np.ceil(3.0 * sigma)) + 1
    return cv2.GaussianBlur(image, (size, size), sigma, borderType=cv2.BORDER_REFLECT)


def blend(image: np.ndarray, blurred: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``image + weight * (blurred - image)``, rounded; exact where ``weight == 0``.

    OpenCV divides by ``weight + (1 - weight) + 1e-5``: at weight 0 a value
    ``v`` becomes ``v / 1.00001``, at most 0.003 off, which rounds back to ``v``.
    """
    if image.shape != blurred.shape or image.shape[:2] != weight.shape:
        raise ValueError(f"shapes differ: image {image.shape}, blurred {blurred.shape}, weight {weight.shape}")
    return cv2.blendLinear(blurred, image, weight, np.float32(1.0) - weight)


def selective_blur(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    params: BlurParams,
    energy: np.ndarray | None = None,
    analysis: AnalysisParams | None = None,
) -> np.ndarray:
    """Blur an RGB ``uint8`` image through a soft mask.

    Parameters
    ----------
    image : uint8 (H, W, 3)
    mask : float32 (H, W) in 0..1
    params : BlurParams
    energy : float32 (h, w), optional
        Unclipped work-grid energy of ``image`` (:attr:`core.frequency.Analysis.raw`),
        needed by ``target`` mode.
    analysis : AnalysisParams, optional
        How ``energy`` was measured; ``target`` mode measures the blurred copy the same way.

    Returns
    -------
    A new uint8 (H, W, 3) array, byte-identical to ``image`` wherever ``mask == 0``.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if mask.dtype != np.float32 or mask.shape != image.shape[:2]:
        raise ValueError(f"mask must be float32 {image.shape[:2]}, got {mask.dtype} {mask.shape}")
    box = support_box(mask, margin=_MARGIN, align=WORK_SCALE)
    if box is None or params.strength == 0.0:
        return image.copy()
    y0, y1, x0, x1 = box
    region = image[y0:y1, x0:x1]
    blurred = gaussian(region, sigma=params.sigma)
    weight = mask[y0:y1, x0:x1]
    if params.mode == "target":
        if energy is None or analysis is None:
            raise ValueError("target mode needs the energy of the image and the analysis parameters")
        weight = weight * _target_share(energy, blurred, box, params.target, analysis)
    if params.strength != 1.0:
        weight = weight * np.float32(params.strength)
    mixed = blend(region, blurred, np.ascontiguousarray(weight))
    if mixed.shape == image.shape:
        return mixed
    out = image.copy()
    out[y0:y1, x0:x1] = mixed
    return out


def _target_share(
    energy: np.ndarray, blurred: np.ndarray, box: tuple[int, int, int, int], target: float, analysis: AnalysisParams
) -> np.ndarray:
    """Per-pixel share of the blurred copy that brings the energy down to ``target``."""
    y0, y1, x0, x1 = box
    before = energy[y0 // WORK_SCALE : (y1 + WORK_SCALE - 1) // WORK_SCALE,
                    x0 // WORK_SCALE : (x1 + WORK_SCALE - 1) // WORK_SCALE]  # fmt: skip
    after = raw_energy(blurred, params=analysis)
    drop = np.maximum(before - after, np.float32(1e-3))
    share = (before - np.float32(target)) / drop
    np.clip(share, 0.0, 1.0, out=share)
    return expand(share, blurred.shape)
