"""Scores of one cleaning: energy before/after, mask coverage, structural similarity.

SSIM follows Wang et al. (2004) as scikit-image computes it with
``gaussian_weights=True, sigma=1.5, use_sample_covariance=False``: on luma,
an 11x11 Gaussian window, K1 = 0.01, K2 = 0.03, averaged over the frame
without a 5-pixel border. Where the window sees no changed pixel the SSIM is
exactly 1, so only the neighbourhood of the changes is computed: in bands of
rows, the runs of columns near a change, side by side in one strip.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TypeAlias

import cv2
import numpy as np

from core.mask import nonzero_runs, side_by_side

_SIGMA = 1.5
_RADIUS = 5  # int(3.5 * sigma + 0.5), scikit-image's truncation
_C1 = (0.01 * 255.0) ** 2
_C2 = (0.03 * 255.0) ** 2
# The window as scikit-image and cv2.GaussianBlur build it.
_KERNEL = cv2.getGaussianKernel(2 * _RADIUS + 1, _SIGMA, cv2.CV_32F)
# Changes are gathered in bands of this many averaged rows; within a band, changes at most _JOIN
# columns apart are computed as one run (the windows' reach on both sides costs about as much).
_BAND = 32
_JOIN = 24
# What a run costs besides its pixels (copies, a sum, Python), in pixels of the map.
_RUN_COST = 1500

# (y0, y1, x0, x1): rows y0..y1-1 and columns x0..x1-1; empty when y0 == y1.
Box: TypeAlias = tuple[int, int, int, int]


@dataclass(frozen=True)
class Scores:
    """What one cleaning did, on the fixed scale of the Matrix Vision map.

    ``sink_energy_*`` are means of the map weighted by the mask (the energy
    where the blur went); ``mask_coverage`` is the mean of the mask;
    ``highlight_coverage`` the share of the frame under tamed highlights.
    """

    width: int
    height: int
    mask_coverage: float
    energy_mean_before: float
    energy_mean_after: float
    energy_p95_before: float
    energy_p95_after: float
    sink_energy_before: float
    sink_energy_after: float
    ssim: float
    highlight_coverage: float = 0.0

    @property
    def sink_energy_reduction(self) -> float:
        """Share of the energy inside the mask the blur removed (0 when nothing was masked)."""
        if self.sink_energy_before <= 0.0:
            return 0.0
        return 1.0 - self.sink_energy_after / self.sink_energy_before

    def as_dict(self) -> dict[str, float]:
        values = {key: float(value) for key, value in asdict(self).items()}
        values["sink_energy_reduction"] = self.sink_energy_reduction
        return values


def compute_scores(
    resized: np.ndarray,
    cleaned: np.ndarray,
    *,
    energy_before: np.ndarray,
    energy_after: np.ndarray,
    mask: np.ndarray,
    highlights: np.ndarray | None = None,
    changed: Box | None = None,
) -> Scores:
    """Scores of ``cleaned`` against ``resized`` (both RGB ``uint8``), maps float32 (H, W).

    ``changed`` is ``changed_box(resized, cleaned)`` if the caller has it already.
    """
    for name, values in (("energy_before", energy_before), ("energy_after", energy_after), ("mask", mask)):
        if values.shape != resized.shape[:2]:
            raise ValueError(f"{name} must have shape {resized.shape[:2]}, got {values.shape}")
    weight = cv2.mean(mask)[0]
    return Scores(
        width=resized.shape[1],
        height=resized.shape[0],
        mask_coverage=weight,
        energy_mean_before=cv2.mean(energy_before)[0],
        energy_mean_after=cv2.mean(energy_after)[0],
        energy_p95_before=percentile(energy_before, 95.0),
        energy_p95_after=percentile(energy_after, 95.0),
        sink_energy_before=_weighted_mean(energy_before, mask, weight),
        sink_energy_after=_weighted_mean(energy_after, mask, weight),
        ssim=ssim(resized, cleaned, changed=changed),
        highlight_coverage=0.0 if highlights is None else cv2.mean(highlights)[0],
    )


def percentile(values: np.ndarray, q: float) -> float:
    """The ``q``-th percentile (nearest rank below) of a map, in linear time.

    Taken over every second pixel in each direction: the maps are interpolated
    from a grid of half the resolution, so the rest adds nothing but time.
    """
    flat = np.ascontiguousarray(values[::2, ::2]).ravel()
    rank = int(q / 100.0 * (flat.size - 1))
    return float(np.partition(flat, rank)[rank])


def changed_box(first: np.ndarray, second: np.ndarray) -> Box:
    """Bounding box of the pixels where two RGB ``uint8`` images of one shape differ (empty if nowhere)."""
    _check_pair(first, second)
    h, w = first.shape[:2]
    # Channels side by side, hence the thirds.
    x, y, width, height = cv2.boundingRect(cv2.absdiff(first, second).reshape(h, w * 3))
    if width == 0:
        return 0, 0, 0, 0
    return y, y + height, x // 3, (x + width + 2) // 3


def ssim(first: np.ndarray, second: np.ndarray, *, changed: Box | None = None) -> float:
    """Mean structural similarity of two RGB ``uint8`` images (on luma; 1.0 when equal).

    ``changed`` is ``changed_box(first, second)`` if the caller has it already.
    """
    _check_pair(first, second)
    y0, y1, x0, x1 = changed_box(first, second) if changed is None else changed
    if y0 >= y1 or x0 >= x1:
        return 1.0
    h, w = first.shape[:2]
    if h <= 2 * _RADIUS or w <= 2 * _RADIUS:
        # No border is left out, so windows at the edges reflect: only the whole frame reproduces that.
        return float(cv2.mean(_ssim_map(_luma(first), _luma(second)))[0])
    runs = _touched_runs(cv2.absdiff(first[y0:y1, x0:x1], second[y0:y1, x0:x1]), (y0, x0), (h, w))
    if not runs:
        return 1.0
    # Every run with the reach of its windows, side by side in one strip: one filter pass for all of them.
    # A run's windows stay inside its own columns, and the averaged pixels' windows inside the frame.
    reach = [(r0 - _RADIUS, r1 + _RADIUS, c0 - _RADIUS, c1 + _RADIUS) for r0, r1, c0, c1 in runs]
    offsets = np.cumsum([0, *(x1 - x0 for _y0, _y1, x0, x1 in reach)]).tolist()
    rows = max(y1 - y0 for y0, y1, _x0, _x1 in reach)
    strips = [_luma(side_by_side(image, reach, rows=rows)) for image in (first, second)]
    local = _ssim_map(*strips)
    touched = 0.0
    area = 0
    for (r0, r1, c0, c1), at in zip(runs, offsets, strict=False):
        run_area = (r1 - r0) * (c1 - c0)
        touched += cv2.mean(local[_RADIUS : _RADIUS + r1 - r0, at + _RADIUS : at + _RADIUS + c1 - c0])[0] * run_area
        area += run_area
    averaged = (h - 2 * _RADIUS) * (w - 2 * _RADIUS)
    return float((touched + averaged - area) / averaged)


def _touched_runs(diff: np.ndarray, origin: tuple[int, int], shape: tuple[int, int]) -> list[Box]:
    """Where the averaged pixels' windows see a change: boxes in bands of :data:`_BAND` rows.

    ``diff`` is the absolute difference (``uint8`` (h, w, 3)) of the images in the box at ``origin``.
    The changed bounding box covers most of a photo, but the changes themselves about half of it at
    most: per band, the columns within the window's reach of a change, split where they leave gaps.
    """
    y0, x0 = origin
    h, w = shape
    first = _RADIUS + max(0, y0 - 2 * _RADIUS) // _BAND * _BAND
    bands = np.arange(first, min(h - _RADIUS, y0 + diff.shape[0] + _RADIUS), _BAND)
    # Per band, the changed columns among the rows its windows reach.
    flat = diff.reshape(diff.shape[0], -1)
    reached = np.stack([flat[max(0, r - _RADIUS - y0) : r + _BAND + _RADIUS - y0].max(axis=0) for r in bands.tolist()])
    channels = reached.reshape(bands.size, -1, 3)
    band, start, stop = nonzero_runs(channels[..., 0] | channels[..., 1] | channels[..., 2], join=_JOIN)
    if band.size == 0:
        return []
    r0 = bands[band]
    r1 = np.minimum(r0 + _BAND, h - _RADIUS)
    c0 = np.clip(start + x0 - _RADIUS, _RADIUS, w - _RADIUS)
    c1 = np.clip(stop + x0 + _RADIUS, _RADIUS, w - _RADIUS)
    whole = (int(r0[0]), int(r1[-1]), int(c0.min()), int(c1.max()))
    strip = (_BAND + 2 * _RADIUS) * int((c1 - c0 + 2 * _RADIUS).sum()) + _RUN_COST * r0.size
    if (whole[1] - whole[0] + 2 * _RADIUS) * (whole[3] - whole[2] + 2 * _RADIUS) <= strip:
        # Changes nearly everywhere: one box costs less than the runs with their windows' reach.
        return [whole]
    return list(zip(r0.tolist(), r1.tolist(), c0.tolist(), c1.tolist(), strict=True))


def _check_pair(first: np.ndarray, second: np.ndarray) -> None:
    if first.shape != second.shape or first.dtype != np.uint8 or second.dtype != np.uint8 or first.ndim != 3:
        raise ValueError(f"need two uint8 (H, W, 3) images of one shape, got {first.shape}, {second.shape}")


def _luma(image: np.ndarray) -> np.ndarray:
    luma: np.ndarray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return luma


def _window(values: np.ndarray, dst: np.ndarray | None = None) -> np.ndarray:
    """The Gaussian window mean as float32, of ``uint8`` or float32 values.

    The filter reads ``uint8`` directly: a third faster than converting to
    float first, and the same bits as the float filter except in the last
    few columns of a row, which its SIMD loop leaves to scalar code.
    """
    mean: np.ndarray = cv2.sepFilter2D(values, cv2.CV_32F, _KERNEL, _KERNEL, dst=dst, borderType=cv2.BORDER_REFLECT)
    return mean


def _ssim_map(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-pixel SSIM of two ``uint8`` luma maps, as float32.

    Only the sum of the variances enters, so one window of ``x^2 + y^2``
    serves both; where ``x == y`` under a window every term matches bit for
    bit and the result is exactly 1. The products of grey levels are exact in
    float32 and accumulate straight from ``uint8``. Buffers are reused in
    place: fresh frame-sized arrays cost page faults that outweigh the
    arithmetic.
    """
    mu_x = _window(x)
    mu_y = _window(y)
    moment = np.zeros(x.shape, np.float32)
    cv2.accumulateProduct(x, y, moment)
    cross = _window(moment)
    moment.fill(0.0)
    cv2.accumulateSquare(x, moment)
    cv2.accumulateSquare(y, moment)
    squares = _window(moment, dst=moment)
    mean_cross: np.ndarray = cv2.multiply(mu_x, mu_y)
    mean_squares: np.ndarray = cv2.multiply(mu_x, mu_x, dst=mu_x)
    mean_squares += cv2.multiply(mu_y, mu_y, dst=mu_y)
    covariance: np.ndarray = cv2.subtract(cross, mean_cross, dst=cross)
    variances: np.ndarray = cv2.subtract(squares, mean_squares, dst=squares)
    numerator = mean_cross
    numerator *= 2.0
    numerator += _C1
    covariance *= 2.0
    covariance += _C2
    numerator *= covariance
    denominator = mean_squares
    denominator += _C1
    variances += _C2
    denominator *= variances
    numerator /= denominator
    return numerator


def _weighted_mean(values: np.ndarray, weight: np.ndarray, total: float) -> float:
    if total <= 0.0:
        return 0.0
    # Not cv2.sumElems: its float sum depends on where the array lies in memory (the last bit of a score
    # changes from run to run, and with it the frame's bytes, which carry the scores).
    return float(cv2.mean(cv2.multiply(values, weight))[0] / total)
