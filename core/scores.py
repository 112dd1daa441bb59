"""Scores of one cleaning: energy before/after, mask coverage, structural similarity.

SSIM follows Wang et al. (2004) as scikit-image computes it with
``gaussian_weights=True, sigma=1.5, use_sample_covariance=False``: on luma,
an 11x11 Gaussian window, K1 = 0.01, K2 = 0.03, averaged over the frame
without a 5-pixel border. Where the window sees no changed pixel the SSIM is
exactly 1, so only the neighbourhood of the changes is computed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TypeAlias

import cv2
import numpy as np

_SIGMA = 1.5
_RADIUS = 5  # int(3.5 * sigma + 0.5), scikit-image's truncation
_C1 = (0.01 * 255.0) ** 2
_C2 = (0.03 * 255.0) ** 2
# The window as scikit-image and cv2.GaussianBlur build it.
_KERNEL = cv2.getGaussianKernel(2 * _RADIUS + 1, _SIGMA, cv2.CV_32F)

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
    border = _RADIUS if h > 2 * _RADIUS and w > 2 * _RADIUS else 0
    # Averaged: the frame less its border. Touched: pixels whose window sees a change.
    top, bottom, left, right = border, h - border, border, w - border
    ty0, ty1 = max(top, y0 - _RADIUS), min(bottom, y1 + _RADIUS)
    tx0, tx1 = max(left, x0 - _RADIUS), min(right, x1 + _RADIUS)
    if ty0 >= ty1 or tx0 >= tx1:
        return 1.0
    # Computed: the touched pixels plus the reach of their windows.
    ry0, ry1 = max(0, ty0 - _RADIUS), min(h, ty1 + _RADIUS)
    rx0, rx1 = max(0, tx0 - _RADIUS), min(w, tx1 + _RADIUS)
    local = _ssim_map(_luma(first[ry0:ry1, rx0:rx1]), _luma(second[ry0:ry1, rx0:rx1]))
    touched = local[ty0 - ry0 : ty1 - ry0, tx0 - rx0 : tx1 - rx0]
    averaged = (bottom - top) * (right - left)
    untouched = averaged - touched.size
    return float((cv2.sumElems(touched)[0] + untouched) / averaged)


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
    return float(cv2.sumElems(cv2.multiply(values, weight))[0] / (total * values.size))
