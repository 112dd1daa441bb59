"""Scores of one cleaning: energy before/after, mask coverage, structural similarity.

SSIM follows Wang et al. (2004) as scikit-image computes it with
``gaussian_weights=True, sigma=1.5, use_sample_covariance=False``: on luma,
an 11x11 Gaussian window, K1 = 0.01, K2 = 0.03, averaged over the frame
without a 5-pixel border. Where the window sees no changed pixel the SSIM is
exactly 1, so only the neighbourhood of the changes is computed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

_SIGMA = 1.5
_RADIUS = 5  # int(3.5 * sigma + 0.5), scikit-image's truncation
_C1 = (0.01 * 255.0) ** 2
_C2 = (0.03 * 255.0) ** 2


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
) -> Scores:
    """Scores of ``cleaned`` against ``resized`` (both RGB ``uint8``), maps float32 (H, W)."""
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
        ssim=ssim(resized, cleaned),
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


def ssim(first: np.ndarray, second: np.ndarray) -> float:
    """Mean structural similarity of two RGB ``uint8`` images (on luma; 1.0 when equal)."""
    if first.shape != second.shape or first.dtype != np.uint8 or second.dtype != np.uint8 or first.ndim != 3:
        raise ValueError(f"need two uint8 (H, W, 3) images of one shape, got {first.shape}, {second.shape}")
    h, w = first.shape[:2]
    # Bounding box of the changed pixels (channels side by side, hence the thirds).
    x, y, width, height = cv2.boundingRect(cv2.absdiff(first, second).reshape(h, w * 3))
    if width == 0:
        return 1.0
    rows, cols = (y, y + height), (x // 3, (x + width + 2) // 3)
    border = _RADIUS if h > 2 * _RADIUS and w > 2 * _RADIUS else 0
    # Averaged: the frame less its border. Touched: pixels whose window sees a change.
    top, bottom, left, right = border, h - border, border, w - border
    ty0, ty1 = max(top, rows[0] - _RADIUS), min(bottom, rows[1] + _RADIUS)
    tx0, tx1 = max(left, cols[0] - _RADIUS), min(right, cols[1] + _RADIUS)
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


def _luma(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)


def _ssim_map(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-pixel SSIM of two float32 maps.

    Only the sum of the variances enters, so one blur of ``x^2 + y^2`` serves
    both; where ``x == y`` under a window every term matches bit for bit and
    the result is exactly 1. Buffers are reused in place: fresh frame-sized
    arrays cost page faults that outweigh the arithmetic.
    """
    size = (2 * _RADIUS + 1, 2 * _RADIUS + 1)

    def window(values: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(values, size, _SIGMA, borderType=cv2.BORDER_REFLECT)

    mu_x: np.ndarray = window(x)
    mu_y: np.ndarray = window(y)
    scratch: np.ndarray = cv2.multiply(x, y)
    cross: np.ndarray = window(scratch)
    cv2.multiply(x, x, dst=scratch)
    scratch += cv2.multiply(y, y)
    squares: np.ndarray = window(scratch)
    mean_cross: np.ndarray = cv2.multiply(mu_x, mu_y, dst=scratch)
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
