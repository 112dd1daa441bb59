"""core.frequency: the Matrix Vision map on a fixed scale."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from core.frequency import (
    AnalysisParams,
    analyze,
    energy_map,
    energy_map_after,
    highpass,
    luminance,
    map_reach,
    raw_energy,
    work_shape,
)

PARAMS = AnalysisParams()


def flat(value: int, shape: tuple[int, int] = (480, 832)) -> np.ndarray:
    return np.full((*shape, 3), value, np.uint8)


def stripes_patch(background: np.ndarray, contrast: int) -> np.ndarray:
    image = background.copy()
    xx = np.arange(120)
    pattern = np.where((xx // 2) % 2 == 0, 128 - contrast // 2, 128 + contrast // 2).astype(np.uint8)
    image[200:320, 300:420] = pattern[None, :, None]
    return image


@pytest.mark.parametrize("value", [0, 37, 255])
def test_a_flat_image_has_no_energy(value: int) -> None:
    analysis = analyze(flat(value), params=PARAMS)
    assert (analysis.energy == 0).all() and (analysis.sinks == 0).all()


@pytest.mark.parametrize("direction", ["horizontal", "vertical", "diagonal"])
def test_a_smooth_gradient_stays_near_zero(direction: str) -> None:
    yy, xx = np.mgrid[0:480, 0:832].astype(np.float32)
    ramp = {"horizontal": xx / 831, "vertical": yy / 479, "diagonal": (xx + yy) / 1310}[direction]
    image = np.dstack([np.rint(30 + 200 * ramp).astype(np.uint8)] * 3)
    energy = energy_map(image, params=PARAMS)
    assert energy.max() < 0.03


def test_the_scale_is_fixed_not_per_image() -> None:
    # The same patch reads the same whether or not the rest of the frame is busy.
    calm = stripes_patch(flat(128), 80)
    busy = calm.copy()
    busy[:, 600:] = np.random.default_rng(0).integers(0, 256, (480, 232, 3), dtype=np.uint8)
    inside = (slice(230, 290), slice(330, 390))
    np.testing.assert_allclose(
        energy_map(calm, params=PARAMS)[inside], energy_map(busy, params=PARAMS)[inside], atol=1e-6
    )


def test_energy_grows_with_contrast_until_it_saturates() -> None:
    centre = (260, 360)
    values = [energy_map(stripes_patch(flat(128), c), params=PARAMS)[centre] for c in (10, 20, 40, 200)]
    assert values[0] < values[1] < values[2] <= values[3] == 1.0


def test_one_point_on_the_scale_means_scale_grey_levels() -> None:
    # Alternating columns 0/2s grey levels apart: |Y - G(Y)| is about s everywhere inside.
    s = 12
    image = stripes_patch(flat(128), 2 * s)
    expected = float(np.abs(highpass(luminance(image), sigma=PARAMS.sigma))[230:290, 330:390].mean()) / PARAMS.scale
    assert raw_energy(image, params=PARAMS)[120:140, 170:200].mean() == pytest.approx(expected, rel=0.05)


def test_luminance_is_bt601() -> None:
    image = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]]], np.uint8)
    assert luminance(image).tolist() == [[76.0, 150.0, 29.0, 18.0]]


def test_highpass_is_the_absolute_difference_to_the_gaussian() -> None:
    luma = luminance(np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    blurred = cv2.GaussianBlur(luma, (9, 9), 1.2, borderType=cv2.BORDER_REFLECT)
    expected = np.abs(luma - blurred)
    expected[expected < 1e-3] = 0.0
    np.testing.assert_array_equal(highpass(luma, sigma=1.2), expected)


def test_texture_off_makes_every_outline_a_sink() -> None:
    image = flat(60)
    image[:, 416:] = 200  # one strong edge
    with_texture = analyze(image, params=PARAMS).sinks.max()
    without = analyze(image, params=AnalysisParams(texture=False)).sinks.max()
    assert with_texture < 0.05 < without


@settings(max_examples=30, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(2, 90), st.integers(2, 90), st.just(3))))
def test_maps_have_the_promised_shapes_types_and_range(image: np.ndarray) -> None:
    analysis = analyze(image, params=PARAMS)
    assert analysis.energy.shape == image.shape[:2] and analysis.energy.dtype == np.float32
    assert analysis.sinks.shape == analysis.fill.shape == analysis.raw.shape == work_shape(image.shape)
    for values in (analysis.energy, analysis.sinks, analysis.fill):
        assert values.dtype == np.float32 and values.min() >= 0.0 and values.max() <= 1.0
    assert analysis.raw.min() >= 0.0


@pytest.mark.parametrize("at", [(200, 300), (201, 301), (0, 0), (479, 831)])
def test_an_edit_moves_the_map_exactly_as_far_as_the_reach(photos: dict[str, np.ndarray], at: tuple[int, int]) -> None:
    original = cv2.resize(photos["astronaut"], (832, 480), interpolation=cv2.INTER_AREA)
    edited = original.copy()
    edited[at] = 255 - edited[at]
    moved = np.argwhere(energy_map(edited, params=PARAMS) != energy_map(original, params=PARAMS))
    reach = np.abs(moved - np.array(at)).max(axis=0)
    assert reach.max() == map_reach(PARAMS)


def blurred_inside(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    y0, y1, x0, x1 = box
    edited = image.copy()
    edited[y0:y1, x0:x1] = cv2.GaussianBlur(image, (5, 5), 1.5)[y0:y1, x0:x1]
    return edited


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(["astronaut", "chelsea", "coffee", "rocket"]),
    # Even sizes of the rules (832 % 32 == 0, 720 % 32 == 16), one with 840 % 32 == 8, and an odd one.
    size=st.sampled_from([(832, 480), (720, 1280), (840, 480), (833, 481)]),
    corner=st.tuples(st.floats(0, 1), st.floats(0, 1)),
    extent=st.tuples(st.integers(1, 400), st.integers(1, 400)),
)
def test_the_map_after_an_edit_is_the_map_of_the_whole_frame(
    photos: dict[str, np.ndarray],
    name: str,
    size: tuple[int, int],
    corner: tuple[float, float],
    extent: tuple[int, int],
) -> None:
    original = cv2.resize(photos[name], size, interpolation=cv2.INTER_AREA)
    h, w = original.shape[:2]
    y0, x0 = int(corner[0] * (h - 1)), int(corner[1] * (w - 1))
    box = (y0, min(h, y0 + extent[0]), x0, min(w, x0 + extent[1]))
    edited = blurred_inside(original, box)
    after = energy_map_after(edited, before=energy_map(original, params=PARAMS), changed=box, params=PARAMS)
    np.testing.assert_array_equal(after, energy_map(edited, params=PARAMS))


def test_the_map_after_no_edit_is_a_copy_of_the_map_before(photo: np.ndarray) -> None:
    before = energy_map(photo, params=PARAMS)
    after = energy_map_after(photo, before=before, changed=(0, 0, 0, 0), params=PARAMS)
    np.testing.assert_array_equal(after, before)
    assert after is not before


def test_the_map_after_needs_the_map_before_of_the_frame() -> None:
    with pytest.raises(ValueError, match="before"):
        energy_map_after(flat(0), before=np.zeros((48, 83), np.float32), changed=(0, 1, 0, 1), params=PARAMS)


def test_input_is_not_modified(photo: np.ndarray) -> None:
    before = photo.copy()
    analyze(photo, params=PARAMS)
    np.testing.assert_array_equal(photo, before)


@pytest.mark.parametrize(
    "kwargs", [{"sigma": 0.1}, {"window": 0}, {"scale": 0}, {"texture_window": 1}, {"fill_low": 0.7, "fill_high": 0.6}]
)
def test_bad_parameters_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        AnalysisParams(**kwargs)  # type: ignore[arg-type]


def test_bad_images_are_refused() -> None:
    with pytest.raises(ValueError, match="image"):
        luminance(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="luma"):
        highpass(np.zeros((4, 4), np.uint8), sigma=1.0)
