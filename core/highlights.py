"""Highlight taming: small near-white specular spots pulled toward their surroundings.

A glint that "glows pure white" is a sink of its own: tiny, maximal contrast,
and the blur of the mask barely dims it. A spot is a connected region whose
every channel is at least ``level`` (near-white, unsaturated), no larger than
``max_area`` pixels (a white wall is a surface, not a glint), on surroundings
at least ``contrast`` grey levels darker than ``level``. The surroundings are
the median colour of eight points on the spot's bounding box grown by
``radius`` (corners and mid-edges: cheap, and robust to a neighbouring
glint). The spot moves ``strength`` of the way toward that colour, its
one-pixel rim half as far.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# BT.601 luma weights, as cv2.COLOR_RGB2GRAY uses.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
# The rim of a spot reaches one pixel beyond it.
_MARGIN = 1


@dataclass(frozen=True)
class HighlightParams:
    """enabled : the off switch.
    level : minimum of R, G and B for a pixel to count as near-white.
    max_area : largest spot in output pixels.
    contrast : grey levels the surroundings must lie below ``level``.
    radius : reach of the surroundings in output pixels.
    strength : share of the way from the spot to its surroundings (0..1).
    """

    enabled: bool = True
    level: int = 235
    max_area: int = 120
    contrast: int = 50
    radius: int = 5
    strength: float = 0.6

    def __post_init__(self) -> None:
        if not 0 <= self.level <= 255:
            raise ValueError(f"level must be in 0..255, got {self.level}")
        if self.max_area < 1:
            raise ValueError(f"max_area must be >= 1, got {self.max_area}")
        if not 0 <= self.contrast <= 255:
            raise ValueError(f"contrast must be in 0..255, got {self.contrast}")
        if not 1 <= self.radius <= 64:
            raise ValueError(f"radius must be in 1..64, got {self.radius}")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be in 0..1, got {self.strength}")


def find_highlights(image: np.ndarray, *, params: HighlightParams) -> np.ndarray:
    """Soft mask (float32 (H, W), 0..1) of the specular spots of an RGB ``uint8`` image."""
    return tame_highlights(image, params=params)[1]


def tame_highlights(image: np.ndarray, *, params: HighlightParams) -> tuple[np.ndarray, np.ndarray]:
    """Pull specular spots toward the colour around them.

    Returns the new image and the spot mask (float32 (H, W): 1 on a spot, 0.5
    on its rim, 0 elsewhere); the image is a copy, unchanged where the mask is 0.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    out = image.copy()
    spots = np.zeros(image.shape[:2], np.float32)
    if not params.enabled:
        return out, spots
    white = cv2.inRange(image, (params.level,) * 3, (255, 255, 255))
    if cv2.countNonZero(white) == 0:  # most frames: nothing near-white at all
        return out, spots
    count, labels, stats, _centroids = cv2.connectedComponentsWithStatsWithAlgorithm(
        white, 8, cv2.CV_32S, cv2.CCL_GRANA
    )
    small = stats[:, cv2.CC_STAT_AREA] <= params.max_area
    small[0] = False
    if not small.any():
        return out, spots
    colours = np.zeros((count, 3), np.float32)
    colours[small] = _surroundings(image, stats[small], params.radius)
    keep = small & (params.level - colours @ _LUMA >= params.contrast)
    if not keep.any():
        return out, spots
    y0, y1, x0, x1 = _around(stats[keep], image.shape)
    ids = np.where(keep, np.arange(count), 0).astype(np.float32)[labels[y0:y1, x0:x1]]
    grown = cv2.dilate(ids, np.ones((3, 3), np.uint8))  # each spot plus its one-pixel rim
    where = np.flatnonzero(grown)
    weight = np.where(ids.ravel()[where] > 0, np.float32(1.0), np.float32(0.5))
    region = out[y0:y1, x0:x1]
    pixels = region.reshape(-1, 3)[where].astype(np.float32)
    target = colours[grown.ravel()[where].astype(np.intp)]
    moved = pixels + (target - pixels) * (weight * np.float32(params.strength))[:, None]
    tamed = region.copy()
    tamed.reshape(-1, 3)[where] = (moved + np.float32(0.5)).astype(np.uint8)
    out[y0:y1, x0:x1] = tamed
    local = np.zeros(grown.shape, np.float32)
    local.ravel()[where] = weight
    spots[y0:y1, x0:x1] = local
    return out, spots


def _surroundings(image: np.ndarray, boxes: np.ndarray, radius: int) -> np.ndarray:
    """Median colour (float32 (n, 3)) of eight points around each box (stats rows), ``radius`` outside it."""
    h, w = image.shape[:2]
    left = boxes[:, cv2.CC_STAT_LEFT]
    top = boxes[:, cv2.CC_STAT_TOP]
    right = left + boxes[:, cv2.CC_STAT_WIDTH] - 1
    bottom = top + boxes[:, cv2.CC_STAT_HEIGHT] - 1
    xs = np.stack([left - radius, (left + right) // 2, right + radius])
    ys = np.stack([top - radius, (top + bottom) // 2, bottom + radius])
    # The 3x3 grid of points minus its centre (the spot itself).
    px = np.clip(xs[[0, 1, 2, 0, 2, 0, 1, 2]], 0, w - 1)
    py = np.clip(ys[[0, 0, 0, 1, 1, 2, 2, 2]], 0, h - 1)
    samples = image[py, px].astype(np.float32)  # (8, n, 3)
    return np.median(samples, axis=0).astype(np.float32)


def _around(boxes: np.ndarray, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """The union of connected-component boxes (stats rows), grown by the margin and clipped."""
    h, w = shape[:2]
    left = int(boxes[:, cv2.CC_STAT_LEFT].min())
    top = int(boxes[:, cv2.CC_STAT_TOP].min())
    right = int((boxes[:, cv2.CC_STAT_LEFT] + boxes[:, cv2.CC_STAT_WIDTH]).max())
    bottom = int((boxes[:, cv2.CC_STAT_TOP] + boxes[:, cv2.CC_STAT_HEIGHT]).max())
    return max(0, top - _MARGIN), min(h, bottom + _MARGIN), max(0, left - _MARGIN), min(w, right + _MARGIN)

