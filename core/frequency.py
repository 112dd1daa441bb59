"""The Matrix Vision map: where an image carries high-frequency energy.

On luminance at the output resolution: the high-pass ``|Y - G_sigma(Y)|``,
averaged over a small window (local energy) and divided by a **fixed** scale,
so that 0.5 means the same amount of detail in every image and a rule's
threshold needs no per-image calibration. Flat walls, sky and smooth
gradients stay near 0; lace, fur, text and glints go towards 1.

The high-pass is taken at full resolution (the detail lives there); window
statistics are computed on a 2x area-reduced grid (:data:`WORK_SCALE`) and the
map is interpolated back. A window of 9 px has no detail left to lose at
half resolution, and this makes the whole analysis about four times cheaper.

A change of the image moves its map only within :func:`map_reach` pixels, so
the map of an edited frame (:func:`energy_map_after`) is recomputed only
around the edit.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from core.texture import fill_fraction, texture_weight

# Window statistics (energy, fill fraction) and the mask live on this coarser grid.
WORK_SCALE = 2
# High-pass values below this (grey levels) are float rounding, not detail.
NOISE_FLOOR = 1e-3
# OpenCV's SIMD loops compute the last pixels of a row that do not fill a vector in scalar code,
# rounded differently. A crop whose columns start on a multiple of this and end on one (or at the
# frame's edge) computes every pixel in the same lane as the whole frame does, up to 32 floats wide.
_LANES = 32


@dataclass(frozen=True)
class AnalysisParams:
    """How the Matrix Vision map and the sink score are computed.

    sigma : high-pass Gaussian sigma in output pixels; detail finer than
        about ``2 * sigma`` counts as high frequency.
    window : local energy window in output pixels.
    scale : mean ``|Y - G(Y)|`` in grey levels (0..255) that maps to 1.0; the
        fixed scale of the map.
    texture : weigh the sink score by texture density (``False``: every
        outline counts as a sink too).
    texture_window : window of the fill fraction in output pixels.
    fill_low, fill_high : fill fractions mapped to "outline" (weight 0) and
        "texture" (weight 1), see :mod:`core.texture`.
    """

    sigma: float = 1.2
    window: int = 9
    scale: float = 24.0
    texture: bool = True
    texture_window: int = 21
    fill_low: float = 0.42
    fill_high: float = 0.60

    def __post_init__(self) -> None:
        if not 0.3 <= self.sigma <= 10.0:
            raise ValueError(f"sigma must be in 0.3..10, got {self.sigma}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.texture_window < 3:
            raise ValueError(f"texture_window must be >= 3, got {self.texture_window}")
        if self.scale <= 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if not 0.0 <= self.fill_low < self.fill_high <= 1.0:
            raise ValueError(f"need 0 <= fill_low < fill_high <= 1, got {self.fill_low}, {self.fill_high}")


@dataclass(frozen=True)
class Analysis:
    """The maps one analysis produces.

    energy : float32 (H, W) in 0..1, the Matrix Vision map at output resolution.
    raw : float32 (h, w) on the work grid, the same energy before clipping at
        1.0 (what target-energy blending needs).
    sinks : float32 (h, w) in 0..1 on the work grid: energy weighted by texture
        density, what the mask thresholds.
    fill : float32 (h, w) in 0..1 on the work grid (zeros if texture is off).
    """

    energy: np.ndarray
    raw: np.ndarray
    sinks: np.ndarray
    fill: np.ndarray


def luminance(image: np.ndarray) -> np.ndarray:
    """BT.601 luma of an RGB ``uint8`` image as float32 grey levels (0..255)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)


def highpass(luma: np.ndarray, *, sigma: float) -> np.ndarray:
    """``|Y - G_sigma(Y)|`` of a float32 map (same units as ``luma``).

    Differences below :data:`NOISE_FLOOR` are rounding in the filter (its
    weights do not sum to exactly 1 in float32) and become exactly 0, so a
    flat image has no energy at all.
    """
    if luma.dtype != np.float32 or luma.ndim != 2:
        raise ValueError(f"luma must be float32 (H, W), got {luma.dtype} {luma.shape}")
    size = _kernel(sigma)
    out: np.ndarray = cv2.GaussianBlur(luma, (size, size), sigma, borderType=cv2.BORDER_REFLECT)
    cv2.absdiff(luma, out, dst=out)
    cv2.threshold(out, NOISE_FLOOR, 0.0, cv2.THRESH_TOZERO, dst=out)
    return out


def analyze(image: np.ndarray, *, params: AnalysisParams) -> Analysis:
    """Matrix Vision map and sink score of an RGB ``uint8`` image."""
    hp = highpass(luminance(image), sigma=params.sigma)
    work_hp = _reduce(hp)
    raw = _box(work_hp, params.window, 1.0 / params.scale)
    clipped = np.minimum(raw, np.float32(1.0))
    energy = expand(clipped, hp.shape)
    if not params.texture:
        return Analysis(energy=energy, raw=raw, sinks=clipped, fill=np.zeros_like(clipped))
    fill = fill_fraction(work_hp, _reduce(cv2.multiply(hp, hp)), window=_work_window(params.texture_window))
    sinks = cv2.multiply(clipped, texture_weight(fill, low=params.fill_low, high=params.fill_high))
    return Analysis(energy=energy, raw=raw, sinks=sinks, fill=fill)


def raw_energy(image: np.ndarray, *, params: AnalysisParams) -> np.ndarray:
    """Unclipped energy on the work grid (float32 (h, w), 1.0 = ``params.scale``)."""
    return _box(_reduce(highpass(luminance(image), sigma=params.sigma)), params.window, 1.0 / params.scale)


def energy_map(image: np.ndarray, *, params: AnalysisParams) -> np.ndarray:
    """Only the Matrix Vision map (float32 (H, W), 0..1) of an RGB ``uint8`` image."""
    clipped = raw_energy(image, params=params)
    cv2.threshold(clipped, 1.0, 1.0, cv2.THRESH_TRUNC, dst=clipped)  # min(raw, 1) in place
    return expand(clipped, image.shape)


def energy_map_after(
    image: np.ndarray, *, before: np.ndarray, changed: tuple[int, int, int, int], params: AnalysisParams
) -> np.ndarray:
    """``energy_map(image)`` of an edited image, recomputed only near the edit.

    ``before`` is the map of the original image, and ``image`` equals that
    original outside the box ``changed`` (``(y0, y1, x0, x1)``, empty if
    nothing changed). The result equals ``energy_map(image)`` bit for bit
    while the box filter's sums are exact (see :func:`map_reach`).
    """
    h, w = image.shape[:2]
    if before.shape != (h, w):
        raise ValueError(f"before must have shape {(h, w)}, got {before.shape}")
    y0, y1, x0, x1 = changed
    if y0 >= y1 or x0 >= x1:
        return before.copy()
    if h % WORK_SCALE or w % WORK_SCALE:
        # Odd sizes reduce to the work grid with fractional weights that a crop would not reproduce.
        return energy_map(image, params=params)
    reach = map_reach(params)
    # Pixels whose map may change, and the pixels those depend on (rows on the work grid, columns in lanes).
    out_rows, out_cols = _grow(y0, y1, reach, h), _grow(x0, x1, reach, w)
    rows = _grow(*out_rows, reach, h, align=WORK_SCALE)
    cols = _grow(*out_cols, reach, w, align=_LANES)
    if (rows, cols) == ((0, h), (0, w)):
        return energy_map(image, params=params)
    local = energy_map(image[rows[0] : rows[1], cols[0] : cols[1]], params=params)
    out = before.copy()
    out[out_rows[0] : out_rows[1], out_cols[0] : out_cols[1]] = local[
        out_rows[0] - rows[0] : out_rows[1] - rows[0], out_cols[0] - cols[0] : out_cols[1] - cols[0]
    ]
    return out


def map_reach(params: AnalysisParams) -> int:
    """How far, in pixels along each axis, a change of the image can move its Matrix Vision map.

    A map pixel ``Y`` interpolates work rows ``j = (Y - 1) // 2`` and ``j + 1``
    (bilinear 2x, half-pixel centres); each is a box mean over work rows
    ``+- b`` (``b`` half the work window), each of those the mean of image
    rows ``2j`` and ``2j + 1`` of the high-pass, which sees luma within the
    Gaussian's radius ``r``. So ``Y`` depends on rows ``Y - 2 - 2b - r`` to
    ``Y + 2 + 2b + r`` only; mirrored borders stay inside that range. Each
    of these steps computes a pixel from its window alone. The box filter
    keeps running sums, but in double precision: its inputs are float32 values
    within 20 binary orders of each other (:data:`NOISE_FLOOR` / 4 to 255,
    scaled), so sums of up to 2^9 of them are exact, i.e. work windows up to
    21 (``window`` up to about 40 px). So a crop reproduces the whole frame's
    map bit for bit; beyond such windows, to float rounding.
    """
    return _kernel(params.sigma) // 2 + WORK_SCALE * (_work_window(params.window) // 2 + 1)


def work_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The (h, w) of the work grid for an (H, W, ...) image."""
    return (shape[0] + WORK_SCALE - 1) // WORK_SCALE, (shape[1] + WORK_SCALE - 1) // WORK_SCALE


def _kernel(sigma: float) -> int:
    # +-3 sigma holds 99.7% of the weight; OpenCV's own default for float is wider and slower.
    return 2 * int(np.ceil(3.0 * sigma)) + 1


def _reduce(values: np.ndarray) -> np.ndarray:
    h, w = work_shape(values.shape)
    return cv2.resize(values, (w, h), interpolation=cv2.INTER_AREA)


def expand(values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A work-grid map interpolated back to the (H, W) of an (H, W, ...) image."""
    out = cv2.resize(values, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return out.reshape(shape[:2])


def _grow(start: int, stop: int, by: int, size: int, *, align: int = 1) -> tuple[int, int]:
    """``start..stop`` grown by ``by`` within ``0..size``, the ends on multiples of ``align`` (or at ``size``)."""
    start = max(0, start - by) // align * align
    stop = min(size, -(-(stop + by) // align) * align)
    return start, stop


def _work_window(window: int) -> int:
    return max(1, round(window / WORK_SCALE)) | 1


def _box(values: np.ndarray, window: int, gain: float) -> np.ndarray:
    """Window mean times ``gain`` (the box filter divides by the area anyway, so the scale is free)."""
    size = _work_window(window)
    scaled = values * np.float32(gain)
    mean: np.ndarray = cv2.boxFilter(scaled, cv2.CV_32F, (size, size), borderType=cv2.BORDER_REFLECT)
    return mean
