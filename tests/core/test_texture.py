"""core.texture: the fill fraction tells dense texture from single outlines, whatever the contrast."""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
import pytest

from core.frequency import AnalysisParams, analyze
from core.texture import fill_fraction, texture_weight

SIZE = 160
PARAMS = AnalysisParams()


def grey(values: np.ndarray) -> np.ndarray:
    """A float map of grey levels as an RGB uint8 image."""
    return np.dstack([np.clip(np.rint(values), 0, 255).astype(np.uint8)] * 3)


def render(draw: Callable[[np.ndarray, np.ndarray], np.ndarray], size: int = SIZE) -> np.ndarray:
    """Draw at 4x and area-reduce: anti-aliased edges, as a camera or a generator renders them."""
    yy, xx = np.mgrid[0 : size * 4, 0 : size * 4].astype(np.float32) / 4
    big = draw(yy, xx)
    small: np.ndarray = cv2.resize(big.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return small


def across(yy: np.ndarray, xx: np.ndarray, angle: float) -> np.ndarray:
    t = np.deg2rad(angle)
    distance: np.ndarray = (xx - SIZE / 2) * np.cos(t) + (yy - SIZE / 2) * np.sin(t)
    return distance


def stripes(period: float, contrast: float, angle: float = 0.0) -> np.ndarray:
    return render(lambda yy, xx: 128 + contrast / 2 * np.sign(np.sin(2 * np.pi * across(yy, xx, angle) / period)))


def checker(cell: int, contrast: float) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    return 128 + contrast / 2 * np.where((yy // cell + xx // cell) % 2 == 0, 1.0, -1.0)


def noise(contrast: float, grain: float) -> np.ndarray:
    field = cv2.GaussianBlur(np.random.default_rng(7).standard_normal((SIZE, SIZE)).astype(np.float32), (0, 0), grain)
    values: np.ndarray = 128 + contrast / 4 * np.clip(field / field.std(), -2, 2)
    return values


def step(contrast: float, angle: float, softness: float) -> np.ndarray:
    values = render(lambda yy, xx: np.where(across(yy, xx, angle) > 0, 128 + contrast / 2, 128 - contrast / 2))
    return cv2.GaussianBlur(values, (0, 0), softness) if softness else values


def line(contrast: float, angle: float, thickness: float) -> np.ndarray:
    return render(lambda yy, xx: np.where(np.abs(across(yy, xx, angle)) < thickness / 2, 200 - contrast, 200))


def energetic_fill(values: np.ndarray) -> np.ndarray:
    """Fill fractions where the energy is at least half its peak, away from the frame border."""
    analysis = analyze(grey(values), params=PARAMS)
    energy, fill = analysis.raw[16:-16, 16:-16], analysis.fill[16:-16, 16:-16]
    energetic: np.ndarray = fill[energy >= 0.5 * energy.max()]
    return energetic


OUTLINES = [
    *(
        pytest.param(step(c, a, s), id=f"edge-c{c}-a{a}-s{s}")
        for c in (40, 100, 200)
        for a in (0, 30, 45)
        for s in (0, 0.7, 1.2)
    ),
    *(
        pytest.param(line(c, a, w), id=f"line-c{c}-a{a}-w{w}")
        for c in (40, 100, 200)
        for a in (0, 30)
        for w in (1, 2, 3)
    ),
]
TEXTURES = [
    *(
        pytest.param(stripes(p, c, a), id=f"stripes-p{p}-c{c}-a{a}")
        for p in (2, 3, 4, 6)
        for c in (30, 200)
        for a in (0, 30, 45)
    ),
    *(pytest.param(checker(s, c), id=f"checker-s{s}-c{c}") for s in (1, 2, 3) for c in (30, 200)),
    *(pytest.param(noise(c, g), id=f"noise-c{c}-g{g}") for c in (30, 120) for g in (0.6, 1.0)),
]


@pytest.mark.parametrize("values", OUTLINES)
def test_a_single_outline_reads_as_structure(values: np.ndarray) -> None:
    assert energetic_fill(values).max() < PARAMS.fill_low


@pytest.mark.parametrize("values", TEXTURES)
def test_dense_texture_reads_as_texture(values: np.ndarray) -> None:
    assert np.percentile(energetic_fill(values), 10) > PARAMS.fill_high


@pytest.mark.parametrize("make", [lambda c: stripes(3, c), lambda c: checker(2, c), lambda c: noise(c, 0.8)])
def test_fill_does_not_depend_on_contrast(make: object) -> None:
    weak, strong = (np.median(energetic_fill(make(c))) for c in (30, 200))  # type: ignore[operator]
    assert abs(weak - strong) < 0.05


def test_fill_is_the_occupied_share_for_a_constant_amplitude() -> None:
    highpass = np.zeros((50, 50), np.float32)
    highpass[:, ::3] = 3.0  # energy on a third of every 15-pixel window
    fill = fill_fraction(highpass, highpass * highpass, window=15)
    assert np.allclose(fill[10:-10, 10:-10], 1 / 3, atol=1e-4)


def test_no_energy_means_no_fill() -> None:
    zeros = np.zeros((20, 30), np.float32)
    assert (fill_fraction(zeros, zeros, window=5) == 0).all()


def test_texture_weight_is_a_monotone_step() -> None:
    fill = np.linspace(0, 1, 101, dtype=np.float32)
    weight = texture_weight(fill, low=0.4, high=0.6)
    assert weight.dtype == np.float32
    assert (weight[fill <= 0.4] == 0).all() and (weight[fill >= 0.6] == 1).all()
    assert (np.diff(weight) >= 0).all()


def test_bad_arguments_are_refused() -> None:
    values = np.zeros((8, 8), np.float32)
    with pytest.raises(ValueError, match="window"):
        fill_fraction(values, values, window=4)
    with pytest.raises(ValueError, match="shape"):
        fill_fraction(values, values[:4], window=3)
    with pytest.raises(ValueError, match="low"):
        texture_weight(values, low=0.6, high=0.4)
