"""From the sink score to a soft 0..1 mask of where to blur.

threshold -> speckle removal -> minimum region area -> optional blot breakup
-> dilation -> feathering -> ``max_coverage`` guard. The morphology runs on
the work grid of :mod:`core.frequency` (all sizes are given in output pixels
and converted), and the feathered mask is interpolated to output size.

Coverage is the mean of the soft mask: the share of the frame that is
blurred, a half-blurred pixel counting half.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Literal

import cv2
import numpy as np

ThresholdMode = Literal["absolute", "percentile"]

# Mask values below one grey level are set to exactly 0: the pixel is untouched.
_NEGLIGIBLE = 1.0 / 255.0
# A mask held under max_coverage should still cover at least this share of it; the thresholds searched for one.
_NEAR_CAP = 0.5
_SEARCH_STEPS = 6


@dataclass(frozen=True)
class MaskParams:
    """How the sink score becomes a mask (lengths in output pixels).

    mode, threshold, percentile : ``absolute`` blurs where the score exceeds
        ``threshold`` (on the fixed scale of the map); ``percentile`` where it
        exceeds that percentile of the image's own scores, but never below
        ``threshold`` (so a flat image stays untouched).
    speckle : radius of the opening that removes specks and thin threads.
    min_area : regions smaller than this many pixels are dropped.
    dilate : radius by which the kept regions grow.
    feather : Gaussian sigma of the soft edge.
    max_coverage : the mask never covers more than this share of the frame.
    blots : break regions of at least ``blot_min_area`` pixels into irregular
        blots of about ``blot_size`` pixels, keeping ``blot_keep`` of them.
    """

    mode: ThresholdMode = "absolute"
    threshold: float = 0.18
    percentile: float = 90.0
    speckle: int = 2
    min_area: int = 256
    dilate: int = 4
    feather: float = 3.0
    max_coverage: float = 0.2
    blots: bool = True
    blot_size: int = 48
    blot_keep: float = 0.6
    blot_min_area: int = 20000

    def __post_init__(self) -> None:
        if self.mode not in ("absolute", "percentile"):
            raise ValueError(f"mode must be 'absolute' or 'percentile', got {self.mode!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in 0..1, got {self.threshold}")
        if not 0.0 <= self.percentile <= 100.0:
            raise ValueError(f"percentile must be in 0..100, got {self.percentile}")
        for name in ("speckle", "min_area", "dilate", "blot_min_area"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.feather < 0:
            raise ValueError(f"feather must be >= 0, got {self.feather}")
        if not 0.0 <= self.max_coverage <= 1.0:
            raise ValueError(f"max_coverage must be in 0..1, got {self.max_coverage}")
        if self.blot_size < 4:
            raise ValueError(f"blot_size must be >= 4, got {self.blot_size}")
        if not 0.0 < self.blot_keep <= 1.0:
            raise ValueError(f"blot_keep must be in (0, 1], got {self.blot_keep}")


def build_mask(sinks: np.ndarray, *, shape: tuple[int, ...], params: MaskParams, seed: int = 0) -> np.ndarray:
    """Soft sink mask at output size.

    Parameters
    ----------
    sinks : float32 (h, w)
        Sink score on the work grid (0..1, fixed scale).
    shape : tuple
        (H, W, ...) of the output image.
    params : MaskParams
    seed : int
        Seeds the blot noise; derive it from the image content so that the
        same image always gets the same blots.

    Returns
    -------
    float32 (H, W) in 0..1; exactly 0 where nothing is blurred. Its mean never
    exceeds ``params.max_coverage``.
    """
    if sinks.dtype != np.float32 or sinks.ndim != 2:
        raise ValueError(f"sinks must be float32 (h, w), got {sinks.dtype} {sinks.shape}")
    out_h, out_w = shape[0], shape[1]
    if out_h < sinks.shape[0] or out_w < sinks.shape[1]:
        raise ValueError(f"shape {shape[:2]} is smaller than the sink grid {sinks.shape}")
    scale = out_w / sinks.shape[1]
    threshold = params.threshold
    if params.mode == "percentile":
        threshold = max(threshold, float(np.percentile(sinks, params.percentile)))
    binary = _above(sinks, threshold)
    if cv2.countNonZero(binary) == 0:
        return np.zeros((out_h, out_w), np.float32)
    noise: Callable[[], np.ndarray] | None = None
    if params.blots:
        # Made on first use, once: most frames have no region large enough to break into blots.
        noise = cache(lambda: _blot_noise((sinks.shape[0], sinks.shape[1]), scale, params, seed))

    def soft(level: float) -> tuple[np.ndarray, float]:
        made = _soft_mask(_above(sinks, level), (out_h, out_w), scale, params, noise)
        return made, _coverage(made)

    mask, covered = soft(threshold)
    if covered > params.max_coverage:
        share = cv2.countNonZero(binary) / binary.size
        mask, covered = _within_cap(soft, sinks, threshold, share, (mask, covered), params.max_coverage)
    if covered > params.max_coverage:
        # Still too much: weaken the blur evenly, so the cap holds whatever the image.
        mask *= np.float32(params.max_coverage / covered)
        while _coverage(mask) > params.max_coverage:
            mask *= np.float32(1.0 - 1e-6)
        cv2.threshold(mask, _NEGLIGIBLE, 0.0, cv2.THRESH_TOZERO, dst=mask)
    return mask


def _within_cap(
    soft: Callable[[float], tuple[np.ndarray, float]],
    sinks: np.ndarray,
    threshold: float,
    share: float,
    over: tuple[np.ndarray, float],
    cap: float,
) -> tuple[np.ndarray, float]:
    """A mask (and its coverage) near ``cap`` for sinks whose mask at ``threshold`` covers more (``over``).

    Coverage grows about in step with the thresholded ``share``: that share aimed at the cap once keeps the
    strongest sinks at full blur. Where that leaves under half the cap, because scattered specks (text, a
    fine weave) fall to speckle removal and ``min_area`` or because scores saturate at 1.0, thresholds in
    between are searched. If none comes near the cap from below, the tightest mask found over it is returned
    (and weakened evenly by the caller): the detail a frame has most of is never the one left unblurred.
    """
    raised = max(threshold, float(np.quantile(sinks, 1.0 - share * cap / over[1])))
    mask, covered = soft(raised)
    if covered >= cap * _NEAR_CAP:
        return mask, covered
    low, high = threshold, raised
    for _ in range(_SEARCH_STEPS):
        middle = 0.5 * (low + high)
        candidate = soft(middle)
        if candidate[1] > cap:
            low, over = middle, candidate
        else:
            high = middle
            if candidate[1] > covered:
                mask, covered = candidate
    return (mask, covered) if covered >= cap * _NEAR_CAP else over


def support_box(values: np.ndarray, *, margin: int = 0, align: int = 1) -> tuple[int, int, int, int] | None:
    """Bounding box ``(y0, y1, x0, x1)`` of the non-zero pixels of a 2-D map, or ``None``.

    Grown by ``margin`` and clipped to the map; its edges are rounded outwards
    to multiples of ``align`` (or the map's edge), to stay on a coarser grid.
    """
    flags = values if values.dtype == np.uint8 else (values != 0).view(np.uint8)
    x, y, w, h = cv2.boundingRect(flags)
    if w == 0:
        return None
    rows, cols = values.shape[:2]
    y0 = max(0, y - margin) // align * align
    x0 = max(0, x - margin) // align * align
    y1 = min(rows, -(-(y + h + margin) // align) * align)
    x1 = min(cols, -(-(x + w + margin) // align) * align)
    return y0, y1, x0, x1


def nonzero_runs(flags: np.ndarray, *, join: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of non-zero values along the rows of a 2-D array, joined across gaps of at most ``join``.

    Returns the row, first column and stop column (exclusive) of each run, in reading order.
    """
    rows, width = flags.shape
    edges = np.zeros((rows, width + 2), np.int8)
    edges[:, 1:-1] = flags != 0
    # +1 where a run starts, -1 just after it stops; searched flat (twice as fast), each row width + 1 long.
    steps = np.diff(edges, axis=1).ravel()
    starts, stops = np.flatnonzero(steps == 1), np.flatnonzero(steps == -1)
    if starts.size == 0:
        return starts, starts, stops
    row = starts // (width + 1)
    start, stop = starts - row * (width + 1), stops - row * (width + 1)
    first = np.flatnonzero(np.r_[True, (row[1:] != row[:-1]) | (start[1:] - stop[:-1] > join)])
    last = np.r_[first[1:] - 1, row.size - 1]
    return row[first], start[first], stop[last]


def side_by_side(values: np.ndarray, boxes: Sequence[tuple[int, int, int, int]], *, rows: int) -> np.ndarray:
    """The boxes ``(y0, y1, x0, x1)`` of ``values``, left to right in one strip of ``rows`` rows.

    A box may leave the array: there it is the array mirrored (``BORDER_REFLECT``). Rows below a
    box less tall than the strip are left unset. A single box inside the array is a view.
    """
    if len(boxes) == 1:
        return _mirrored(values, boxes[0])
    widths = [x1 - x0 for _y0, _y1, x0, x1 in boxes]
    strip = np.empty((rows, sum(widths), *values.shape[2:]), values.dtype)
    at = 0
    for box, width in zip(boxes, widths, strict=True):
        part = _mirrored(values, box)
        strip[: part.shape[0], at : at + width] = part
        at += width
    return strip


def _mirrored(values: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """``values[y0:y1, x0:x1]``, mirrored (``BORDER_REFLECT``) where the box leaves the array."""
    y0, y1, x0, x1 = box
    h, w = values.shape[:2]
    inside = values[max(0, y0) : min(h, y1), max(0, x0) : min(w, x1)]
    pads = (max(0, -y0), max(0, y1 - h), max(0, -x0), max(0, x1 - w))
    if not any(pads):
        return inside
    return cv2.copyMakeBorder(inside, *pads, cv2.BORDER_REFLECT)


def _coverage(mask: np.ndarray) -> float:
    return float(cv2.mean(mask)[0])


def _soft_mask(
    binary: np.ndarray,
    shape: tuple[int, int],
    scale: float,
    params: MaskParams,
    noise: Callable[[], np.ndarray] | None,
) -> np.ndarray:
    work = binary
    speckle = round(params.speckle / scale)
    if speckle > 0:
        work = cv2.morphologyEx(work, cv2.MORPH_OPEN, _disc(speckle))
    _count, labels, stats, _centroids = cv2.connectedComponentsWithStatsWithAlgorithm(
        work, 8, cv2.CV_32S, cv2.CCL_GRANA
    )
    areas = stats[:, cv2.CC_STAT_AREA].astype(np.float64) * scale * scale
    keep = areas >= params.min_area
    keep[0] = False  # the background
    if not keep[1:].all():
        work = _lookup(keep, labels)
    if noise is not None:
        large = keep & (areas >= params.blot_min_area)
        if large.any():
            # Holes where the noise is low, inside large regions only.
            holes = cv2.bitwise_and(_lookup(large, labels), noise())
            work = cv2.subtract(work, holes)
    radius = round(params.dilate / scale)
    if radius > 0:
        work = cv2.dilate(work, _disc(radius))
    soft: np.ndarray = work.astype(np.float32)
    sigma = params.feather / scale
    if sigma > 0:
        soft = cv2.GaussianBlur(soft, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    mask = cv2.resize(soft, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR).reshape(shape)
    # Interpolated blur of 0..1 stays in 0..1 up to rounding; below a grey level counts as untouched.
    cv2.threshold(mask, 1.0, 1.0, cv2.THRESH_TRUNC, dst=mask)
    cv2.threshold(mask, _NEGLIGIBLE, 0.0, cv2.THRESH_TOZERO, dst=mask)
    result: np.ndarray = mask
    return result


def _lookup(flags: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """0/1 ``uint8`` image of ``flags[labels]`` (``take`` costs two thirds of indexing here)."""
    looked_up: np.ndarray = flags.view(np.uint8).take(labels)
    return looked_up


def _blot_noise(shape: tuple[int, int], scale: float, params: MaskParams, seed: int) -> np.ndarray:
    """Where blots are cut (1) on the work grid: smooth noise below its ``1 - blot_keep`` quantile."""
    h, w = shape
    cell = max(2.0, params.blot_size / scale)
    grid = np.random.default_rng(seed).random((int(h / cell) + 2, int(w / cell) + 2), dtype=np.float32)
    noise = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    level = float(np.quantile(noise[::2, ::2], 1.0 - params.blot_keep))
    return (noise < np.float32(level)).view(np.uint8)


def _above(values: np.ndarray, threshold: float) -> np.ndarray:
    """0/1 ``uint8`` flags of ``values > threshold``."""
    return (values > np.float32(threshold)).view(np.uint8)


def _disc(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
