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
# A pixel and its eight neighbours (row and column offsets; the pixel itself is number 4):
# a spot's rim touches the spot through one of the neighbours.
_ROWS = np.array([-1, -1, -1, 0, 0, 0, 1, 1, 1])
_COLS = np.array([-1, 0, 1, -1, 0, 1, -1, 0, 1])


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
    white = _near_white(image, params.level)
    if cv2.countNonZero(white) == 0:  # most frames: nothing near-white at all
        return out, spots
    y0, y1, x0, x1 = _label_box(white)
    count, labels, stats, _centroids = cv2.connectedComponentsWithStatsWithAlgorithm(
        white[y0:y1, x0:x1], 8, cv2.CV_32S, cv2.CCL_GRANA
    )
    stats[:, cv2.CC_STAT_LEFT] += x0  # boxes in frame coordinates from here on
    stats[:, cv2.CC_STAT_TOP] += y0
    small = stats[:, cv2.CC_STAT_AREA] <= params.max_area
    small[0] = False
    if not small.any():
        return out, spots
    colours = np.zeros((count, 3), np.float32)
    colours[small] = _surroundings(image, stats[small], params.radius)
    keep = small & (params.level - colours @ _LUMA >= params.contrast)
    if not keep.any():
        return out, spots
    # Only the pixels of each kept spot's box (grown by the rim) are visited, never the whole frame.
    ys, xs, spot = _box_pixels(stats, np.flatnonzero(keep), image.shape[:2])
    weight = _spot_weight(labels, ys - y0, xs - x0, spot)
    chosen = weight > 0
    ys, xs, spot, weight = ys[chosen], xs[chosen], spot[chosen], weight[chosen]
    pixels = image[ys, xs].astype(np.float32)
    moved = pixels + (colours[spot] - pixels) * (weight * np.float32(params.strength))[:, None]
    out[ys, xs] = (moved + np.float32(0.5)).astype(np.uint8)
    spots[ys, xs] = weight
    return out, spots


def _near_white(image: np.ndarray, level: int) -> np.ndarray:
    """255 where all three channels are at least ``level``, else 0 (``cv2.inRange``, at about half the cost)."""
    passed = cv2.threshold(image, level - 1, 255, cv2.THRESH_BINARY)[1]
    # Each channel is now 0 or 255: the grey of a pixel is 255 only if all three are (weights sum to 1).
    grey = cv2.cvtColor(passed, cv2.COLOR_RGB2GRAY)
    white: np.ndarray = cv2.threshold(grey, 254, 255, cv2.THRESH_BINARY)[1]
    return white


def _label_box(white: np.ndarray) -> tuple[int, int, int, int]:
    """Where to label the spots, ``(y0, y1, x0, x1)``: the box of the near-white pixels grown by two
    (room for a rim's neighbours) and clipped to the frame.

    Labelling costs what it scans. The box starts on even coordinates, so that the labeller's 2x2
    blocks, and with them the numbers of the spots (the higher one wins a rim pixel two spots
    share), are the whole frame's; its sides are even where the frame allows (odd ones take a path
    about twice as slow).
    """
    x, y, width, height = cv2.boundingRect(white)
    h, w = white.shape
    y0, x0 = max(y - 2, 0) // 2 * 2, max(x - 2, 0) // 2 * 2
    y1, x1 = min(y + height + 2, h), min(x + width + 2, w)
    return y0, min(y1 + (y1 - y0) % 2, h), x0, min(x1 + (x1 - x0) % 2, w)


def _box_pixels(
    stats: np.ndarray, ids: np.ndarray, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row, column and component id of every pixel in the boxes of ``ids``, grown by one pixel."""
    h, w = shape
    boxes = stats[ids]
    left = np.maximum(boxes[:, cv2.CC_STAT_LEFT] - 1, 0)
    top = np.maximum(boxes[:, cv2.CC_STAT_TOP] - 1, 0)
    width = np.minimum(boxes[:, cv2.CC_STAT_LEFT] + boxes[:, cv2.CC_STAT_WIDTH] + 1, w) - left
    height = np.minimum(boxes[:, cv2.CC_STAT_TOP] + boxes[:, cv2.CC_STAT_HEIGHT] + 1, h) - top
    sizes = width * height
    owner = np.repeat(np.arange(ids.size), sizes)
    offset = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    ys = top[owner] + offset // width[owner]
    xs = left[owner] + offset % width[owner]
    return ys, xs, ids[owner]


def _spot_weight(labels: np.ndarray, ys: np.ndarray, xs: np.ndarray, spot: np.ndarray) -> np.ndarray:
    """1 where pixel ``(ys, xs)`` of ``labels`` belongs to component ``spot``, 0.5 where a neighbour does, else 0."""
    h, w = labels.shape
    # One gather of all 3x3 neighbourhoods (clipped at the edge), not one per neighbour.
    rows = np.clip(ys[:, None] + _ROWS, 0, h - 1)
    cols = np.clip(xs[:, None] + _COLS, 0, w - 1)
    inside = labels[rows, cols] == spot[:, None]
    # Halves: one for touching the spot, one more for being part of it.
    weight: np.ndarray = (inside[:, 4].astype(np.float32) + inside.any(axis=1)) * np.float32(0.5)
    return weight


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
    # The median of eight: the mean of the middle two (exact, and cheaper than np.median).
    ranked = np.sort(image[py, px], axis=0).astype(np.float32)  # (8, n, 3)
    colours: np.ndarray = (ranked[3] + ranked[4]) * np.float32(0.5)
    return colours
