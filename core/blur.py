"""Selective blur: a light Gaussian blended in only where the mask says so.

``gaussian`` mode blends ``mask * strength`` of the blurred copy. ``target``
mode (preferred) blends per pixel only as much as brings the local
high-frequency energy down to ``target`` on the fixed scale of the map: with
``E`` the energy of the frame and ``E_b`` that of the blurred copy, a blend
``a`` has at most ``(1 - a) E + a E_b``, so ``a = (E - target) / (E - E_b)``
(clipped to 0..1, times the mask). Detail already below the target is left
alone; ``sigma`` is the most blur any pixel gets.

Pixels where the blend weight is 0 are byte-identical to the input; all work
happens near the mask: within the reach of the filters around its bounding
box, or, when the mask is scattered over that box, around its runs in bands
of rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from core.frequency import WORK_SCALE, AnalysisParams, expand, map_reach, raw_energy
from core.mask import nonzero_runs, side_by_side, support_box

BlurMode = Literal["gaussian", "target"]

# The mask covers a fifth of a photo at most, but its box most of the frame: it is blurred in bands of
# _BAND rows, where columns of mask at most _JOIN apart make one run, if the runs with their context
# come to at most _STRIP_SHARE of the box (a little over 1: the context is filtered, not blended).
_BAND = 96
_JOIN = 48
_STRIP_SHARE = 1.05


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
    margin = _reach(params, analysis)
    masked = (mask != 0).view(np.uint8)
    box = support_box(masked, margin=margin, align=WORK_SCALE)
    if box is None or params.strength == 0.0:
        return image.copy()
    if params.mode == "target" and (energy is None or analysis is None):
        raise ValueError("target mode needs the energy of the image and the analysis parameters")
    runs = _mask_runs(masked, box, margin)
    if runs is None:
        # The mask spreads over most of its box: one region, with the box's edges as borders.
        y0, y1, x0, x1 = box
        region, weight = image[y0:y1, x0:x1], mask[y0:y1, x0:x1]
        before = None
        if energy is not None:
            before = energy[y0 // WORK_SCALE : -(-y1 // WORK_SCALE), x0 // WORK_SCALE : -(-x1 // WORK_SCALE)]
        runs, offsets, inset = [box], [0], 0
    else:
        region, weight, before, offsets = _gather(image, mask, energy, runs, margin)
        inset = margin
    # Only the rows of the mask are blended; the rest of the region is context.
    rows = slice(inset, inset + weight.shape[0])
    blurred = gaussian(region, sigma=params.sigma)
    if params.mode == "target":
        assert before is not None and analysis is not None  # checked above
        weight = weight * _target_share(before, blurred, params.target, analysis)[rows]
    if params.strength != 1.0:
        weight = weight * np.float32(params.strength)
    mixed = blend(region[rows], blurred[rows], np.ascontiguousarray(weight))
    if runs == [(0, image.shape[0], 0, image.shape[1])]:
        return mixed
    out = image.copy()
    for (r0, r1, c0, c1), at in zip(runs, offsets, strict=False):
        out[r0:r1, c0:c1] = mixed[: r1 - r0, at + inset : at + inset + c1 - c0]
    return out


def _reach(params: BlurParams, analysis: AnalysisParams | None) -> int:
    """How far from a pixel the blur reads (the blurred copy's kernel, and the map of that copy in
    ``target`` mode), rounded up to the work grid: the context a region needs."""
    reach = int(np.ceil(3.0 * params.sigma))
    if params.mode == "target" and analysis is not None:
        reach += map_reach(analysis)
    return -(-reach // WORK_SCALE) * WORK_SCALE


def _mask_runs(
    masked: np.ndarray, box: tuple[int, int, int, int], margin: int
) -> list[tuple[int, int, int, int]] | None:
    """Where the mask is non-zero (``masked``: 0/1 ``uint8``), as boxes on the work grid in bands of
    :data:`_BAND` rows; ``None`` when blurring them, each with ``margin`` of context, costs about as
    much as the whole ``box``.
    """
    h, w = masked.shape
    if h % WORK_SCALE or w % WORK_SCALE:
        return None
    y0, y1, x0, x1 = box
    bands = np.arange(y0 // _BAND * _BAND, y1, _BAND)
    covered = np.stack([masked[r : r + _BAND, x0:x1].max(axis=0) for r in bands.tolist()])
    band, start, stop = nonzero_runs(covered, join=_JOIN)
    r0 = bands[band]
    c0 = (start + x0) // WORK_SCALE * WORK_SCALE
    c1 = np.minimum(-(-(stop + x0) // WORK_SCALE) * WORK_SCALE, w)
    if (_BAND + 2 * margin) * int((c1 - c0 + 2 * margin).sum()) > _STRIP_SHARE * (y1 - y0) * (x1 - x0):
        return None
    return list(zip(r0.tolist(), np.minimum(r0 + _BAND, h).tolist(), c0.tolist(), c1.tolist(), strict=True))


def _gather(
    image: np.ndarray,
    mask: np.ndarray,
    energy: np.ndarray | None,
    runs: list[tuple[int, int, int, int]],
    margin: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, list[int]]:
    """The runs side by side in one strip, each with ``margin`` of context: the image, the mask (the
    band's rows only) and the energy on the work grid; and where each run's context starts.

    Past the frame's edges the context is the frame mirrored: the filters mirror it there too, and
    being symmetric they turn a mirrored input into a mirrored result (the final interpolation clamps
    at the edge, which between a value and its mirror image comes to the same).
    """
    contexts = [(r0 - margin, r0 + _BAND + margin, c0 - margin, c1 + margin) for r0, _r1, c0, c1 in runs]
    offsets = np.cumsum([0, *(x1 - x0 for _y0, _y1, x0, x1 in contexts)]).tolist()
    region = side_by_side(image, contexts, rows=_BAND + 2 * margin)
    bands = [(r0, r0 + _BAND, c0 - margin, c1 + margin) for r0, _r1, c0, c1 in runs]
    weight = side_by_side(mask, bands, rows=_BAND)
    before = None
    if energy is not None:
        work = [(_work(y0), _work(y1), _work(x0), _work(x1)) for y0, y1, x0, x1 in contexts]
        before = side_by_side(energy, work, rows=_work(_BAND + 2 * margin))
    return region, weight, before, offsets


def _work(pixels: int) -> int:
    """The work-grid coordinate of a pixel coordinate on it (a multiple of the scale)."""
    return pixels // WORK_SCALE


def _target_share(before: np.ndarray, blurred: np.ndarray, target: float, analysis: AnalysisParams) -> np.ndarray:
    """Per-pixel share of the blurred copy that brings the energy (``before`` on the work grid) down to ``target``."""
    after = raw_energy(blurred, params=analysis)
    drop = np.maximum(before - after, np.float32(1e-3))
    share = (before - np.float32(target)) / drop
    np.clip(share, 0.0, 1.0, out=share)
    return expand(share, blurred.shape)
