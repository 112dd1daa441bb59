"""Renderings of the Matrix Vision map: a white-on-black glow or a colour map.

Flat regions render black, dense detail bright. ``gamma`` below 1 lifts faint
detail so that it is visible at all; the glow adds a soft halo (a blurred copy
of the map on a quarter grid), the look of the original ComfyUI workflow.
The mask outline, when asked for, traces the edge of where the soft mask is at
least 0.5 (the outermost pixels of that region).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

Style = Literal["glow", "colormap"]

COLORMAPS = {
    "inferno": cv2.COLORMAP_INFERNO,
    "magma": cv2.COLORMAP_MAGMA,
    "viridis": cv2.COLORMAP_VIRIDIS,
    "turbo": cv2.COLORMAP_TURBO,
}


@dataclass(frozen=True)
class HeatmapParams:
    """style : ``glow`` (white on black) or ``colormap``.
    colormap : one of :data:`COLORMAPS` (``colormap`` style).
    gamma : tone curve of the map (below 1 brightens faint detail).
    halo : strength of the glow's soft halo (0 = none).
    outline : draw the mask's outline in ``outline_color``.
    """

    style: Style = "glow"
    colormap: str = "inferno"
    gamma: float = 0.8
    halo: float = 0.35
    outline: bool = True
    outline_color: tuple[int, int, int] = (0, 255, 96)

    def __post_init__(self) -> None:
        if self.style not in ("glow", "colormap"):
            raise ValueError(f"style must be 'glow' or 'colormap', got {self.style!r}")
        if self.colormap not in COLORMAPS:
            raise ValueError(f"colormap must be one of {sorted(COLORMAPS)}, got {self.colormap!r}")
        if not 0.1 <= self.gamma <= 4.0:
            raise ValueError(f"gamma must be in 0.1..4, got {self.gamma}")
        if not 0.0 <= self.halo <= 2.0:
            raise ValueError(f"halo must be in 0..2, got {self.halo}")
        if len(self.outline_color) != 3 or not all(0 <= c <= 255 for c in self.outline_color):
            raise ValueError(f"outline_color must be three values in 0..255, got {self.outline_color!r}")


def render_heatmap(energy: np.ndarray, *, params: HeatmapParams, mask: np.ndarray | None = None) -> np.ndarray:
    """RGB ``uint8`` (H, W, 3) picture of a Matrix Vision map (float32 (H, W), 0..1)."""
    if energy.dtype != np.float32 or energy.ndim != 2:
        raise ValueError(f"energy must be float32 (H, W), got {energy.dtype} {energy.shape}")
    if mask is not None and mask.shape != energy.shape:
        raise ValueError(f"mask must have shape {energy.shape}, got {mask.shape}")
    grey = cv2.LUT(cv2.convertScaleAbs(energy, alpha=255.0), _tone_curve(params.gamma))
    if params.style == "glow":
        if params.halo > 0:
            grey = cv2.add(grey, _halo(grey, params.halo))
        picture = cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)
    else:
        picture = cv2.cvtColor(cv2.applyColorMap(grey, COLORMAPS[params.colormap]), cv2.COLOR_BGR2RGB)
    if params.outline and mask is not None:
        inside = (mask >= np.float32(0.5)).view(np.uint8)
        contours, _hierarchy = cv2.findContours(inside, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(picture, contours, -1, params.outline_color, 1)
    return picture


def _tone_curve(gamma: float) -> np.ndarray:
    levels = np.arange(256, dtype=np.float32) / 255.0
    return np.round(255.0 * levels**gamma).astype(np.uint8)


def _halo(grey: np.ndarray, strength: float) -> np.ndarray:
    h, w = grey.shape
    small = cv2.resize(grey, (max(1, w // 4), max(1, h // 4)), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), 2.0)
    halo = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    return cv2.convertScaleAbs(halo, alpha=strength)
