"""core.blur: a light Gaussian blended through the mask; target-energy mode; untouched pixels stay put."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import core.blur
from core.blur import BlurParams, blend, gaussian, selective_blur
from core.frequency import AnalysisParams, analyze, energy_map, expand, raw_energy

ANALYSIS = AnalysisParams()


def textured(seed: int = 0, shape: tuple[int, int] = (240, 320)) -> np.ndarray:
    """Fine stripes and noise: something a blur visibly changes."""
    rng = np.random.default_rng(seed)
    xx = np.arange(shape[1])
    stripes = np.where((xx // 2) % 2 == 0, 90, 170)[None, :] + rng.integers(-20, 21, shape)
    return np.dstack([np.clip(stripes, 0, 255).astype(np.uint8)] * 3)


def disc_mask(shape: tuple[int, int], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    distance = np.hypot(yy - shape[0] / 2, xx - shape[1] / 2)
    mask: np.ndarray = np.clip((radius - distance) / 8, 0, 1).astype(np.float32)
    return mask


def clean(image: np.ndarray, mask: np.ndarray, params: BlurParams) -> np.ndarray:
    return selective_blur(image, mask, params=params, energy=analyze(image, params=ANALYSIS).raw, analysis=ANALYSIS)


@pytest.mark.parametrize("mode", ["gaussian", "target"])
def test_an_empty_mask_changes_nothing(mode: str) -> None:
    image = textured()
    out = clean(image, np.zeros(image.shape[:2], np.float32), BlurParams(mode=mode))  # type: ignore[arg-type]
    np.testing.assert_array_equal(out, image)
    assert not np.shares_memory(out, image)


@settings(max_examples=30, deadline=None)
@given(
    image=arrays(np.uint8, st.tuples(st.integers(8, 80), st.integers(8, 80), st.just(3))),
    radius=st.floats(0, 60),
    mode=st.sampled_from(["gaussian", "target"]),
    sigma=st.floats(0.3, 4.0),
)
def test_pixels_outside_the_mask_are_byte_identical(image: np.ndarray, radius: float, mode: str, sigma: float) -> None:
    mask = disc_mask(image.shape[:2], radius)
    out = clean(image, mask, BlurParams(mode=mode, sigma=sigma))  # type: ignore[arg-type]
    assert out.dtype == np.uint8 and out.shape == image.shape
    np.testing.assert_array_equal(out[mask == 0], image[mask == 0])


def test_a_full_mask_at_full_strength_is_the_gaussian() -> None:
    image = textured()
    out = clean(image, np.ones(image.shape[:2], np.float32), BlurParams(mode="gaussian", sigma=1.5))
    np.testing.assert_array_equal(out, gaussian(image, sigma=1.5))


def test_blend_is_exact_at_zero_and_one_for_every_value() -> None:
    values = np.arange(256, dtype=np.uint8)
    image = np.dstack([np.tile(values, (256, 1))] * 3)
    other = np.ascontiguousarray(image[::-1, ::-1])
    np.testing.assert_array_equal(blend(image, other, np.zeros((256, 256), np.float32)), image)
    np.testing.assert_array_equal(blend(image, other, np.ones((256, 256), np.float32)), other)


def test_blend_rounds_to_nearest() -> None:
    image = np.zeros((1, 1, 3), np.uint8)
    other = np.full((1, 1, 3), 101, np.uint8)
    assert blend(image, other, np.full((1, 1), 0.7, np.float32)).tolist() == [[[71, 71, 71]]]  # 70.7


def test_target_mode_lowers_energy_inside_the_mask() -> None:
    image = textured()
    mask = disc_mask(image.shape[:2], 80)
    before = energy_map(image, params=ANALYSIS)
    after = energy_map(clean(image, mask, BlurParams(mode="target", sigma=1.5, target=0.1)), params=ANALYSIS)
    inside = mask > 0.99
    assert after[inside].mean() < 0.6 * before[inside].mean()


def test_target_mode_leaves_detail_below_the_target_alone() -> None:
    xx = np.arange(160)[None, :].repeat(120, axis=0)
    faint = np.dstack([(128 + 2 * ((xx // 2) % 2)).astype(np.uint8)] * 3)  # energy far below the target
    out = clean(faint, np.ones((120, 160), np.float32), BlurParams(mode="target", target=0.5))
    np.testing.assert_array_equal(out, faint)


def test_target_mode_blurs_less_than_the_plain_blend() -> None:
    image = textured()
    mask = disc_mask(image.shape[:2], 80)
    plain = clean(image, mask, BlurParams(mode="gaussian", sigma=2.0))
    targeted = clean(image, mask, BlurParams(mode="target", sigma=2.0, target=0.3))

    def change(out: np.ndarray) -> int:
        return int(np.abs(out.astype(int) - image).sum())

    assert 0 < change(targeted) < change(plain)


@settings(max_examples=20, deadline=None)
@given(
    sigmas=st.tuples(st.floats(0.3, 4.0), st.floats(0.3, 4.0)).map(sorted),
    strengths=st.tuples(st.floats(0, 1), st.floats(0, 1)).map(sorted),
    targets=st.tuples(st.floats(0, 1), st.floats(0, 1)).map(sorted),
    seed=st.integers(0, 5),
)
def test_a_stronger_blur_never_raises_energy(
    sigmas: list[float], strengths: list[float], targets: list[float], seed: int
) -> None:
    image = textured(seed, (96, 128))
    mask = disc_mask(image.shape[:2], 40)
    inside = mask > 0
    original = float(energy_map(image, params=ANALYSIS)[inside].mean())

    def energy(**kwargs: object) -> float:
        params = BlurParams(**kwargs)  # type: ignore[arg-type]
        return float(energy_map(clean(image, mask, params), params=ANALYSIS)[inside].mean())

    exact = 2e-3  # where the order is exact, up to float rounding
    assert energy(mode="gaussian", sigma=sigmas[0], strength=strengths[0]) <= original + exact
    # More of the blurred copy, or a lower target: never more energy.
    for sigma in sigmas:
        assert energy(mode="gaussian", sigma=sigma, strength=strengths[1]) <= (
            energy(mode="gaussian", sigma=sigma, strength=strengths[0]) + exact
        )
        assert (
            energy(mode="target", sigma=sigma, target=targets[0])
            <= energy(mode="target", sigma=sigma, target=targets[1]) + exact
        )
    # A wider Gaussian: never more energy, down to a floor. Rounding to uint8 leaves about 0.3 grey levels (0.0125),
    # and the kernel, cut at +-3 sigma to whole pixels, grows by two at once where 3 sigma crosses an integer: from
    # sigma 2.55 to 2.73 the energy in the disc rose by up to 0.030 on these textures (seeds 0-5, sigma steps of 0.05,
    # strengths 0.5 to 1; measured). Hypothesis found 0.022 against the 0.02 allowed before.
    floor = 0.04
    assert energy(mode="gaussian", sigma=sigmas[1], strength=strengths[1]) <= (
        energy(mode="gaussian", sigma=sigmas[0], strength=strengths[1]) + floor
    )


def whole_frame(image: np.ndarray, mask: np.ndarray, params: BlurParams) -> np.ndarray:
    """What the selective blur means: every filter run over the whole frame."""
    blurred = gaussian(image, sigma=params.sigma)
    if params.mode == "gaussian":
        return blend(image, blurred, mask)
    before, after = (raw_energy(frame, params=ANALYSIS) for frame in (image, blurred))
    share = np.clip((before - np.float32(params.target)) / np.maximum(before - after, np.float32(1e-3)), 0, 1)
    return blend(image, blurred, mask * expand(share, image.shape))


@pytest.mark.parametrize("mode", ["gaussian", "target"])
@pytest.mark.parametrize("strip_share", [0.0, 1e9], ids=["one region", "bands"])
@pytest.mark.parametrize(
    "blots",
    [
        pytest.param([(0, 0), (0, 559), (399, 0), (399, 559), (200, 0), (0, 280), (200, 280), (399, 300)], id="edges"),
        pytest.param([(130, 276), (250, 430)], id="inside"),
    ],
)
def test_the_blur_is_the_whole_frame_blur_wherever_the_blots(
    monkeypatch: pytest.MonkeyPatch, mode: str, strip_share: float, blots: list[tuple[int, int]]
) -> None:
    # Work is cut to a region with the filters' reach around the mask (its edges on the work grid),
    # or to bands of rows where each blot's context is its own neighbourhood, mirrored past the
    # frame's edges, and the last band runs past the bottom: neither may change a pixel.
    monkeypatch.setattr(core.blur, "_STRIP_SHARE", strip_share)
    # Faint noise: the target share stays between 0 and 1, so the energy of every pixel counts.
    image = np.clip(128 + np.random.default_rng(3).normal(0, 10, (400, 560, 3)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:400, 0:560]
    mask = np.zeros((400, 560), np.float32)
    for row, col in blots:
        mask = np.maximum(mask, np.clip((21 - np.hypot(yy - row, xx - col)) / 8, 0, 1).astype(np.float32))
    params = BlurParams(mode=mode)  # type: ignore[arg-type]
    expected = whole_frame(image, mask, params)
    assert not np.array_equal(expected, image)
    np.testing.assert_array_equal(clean(image, mask, params), expected)


def test_input_is_not_modified() -> None:
    image = textured()
    before = image.copy()
    clean(image, disc_mask(image.shape[:2], 60), BlurParams())
    np.testing.assert_array_equal(image, before)


def test_bad_arguments_are_refused() -> None:
    image = textured()
    with pytest.raises(ValueError, match="target mode"):
        selective_blur(image, np.ones(image.shape[:2], np.float32), params=BlurParams(mode="target"))
    with pytest.raises(ValueError, match="mask"):
        selective_blur(image, np.ones((4, 4), np.float32), params=BlurParams(mode="gaussian"))
    with pytest.raises(ValueError, match="image"):
        selective_blur(image[:, :, 0], np.ones(image.shape[:2], np.float32), params=BlurParams(mode="gaussian"))
    for kwargs in ({"sigma": 0.1}, {"strength": 1.5}, {"mode": "box"}, {"target": -1}):
        with pytest.raises(ValueError):
            BlurParams(**kwargs)
