"""core.resize: exact sizes, no distortion in cover/contain, area down / Lanczos up, orientation."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.resize import ResizeParams, resize, target_size

MODES = ("cover", "contain", "stretch")


def disc_image(width: int, height: int, radius: int) -> np.ndarray:
    """A white disc centred on a dark field: its bounding box shows any distortion."""
    image = np.full((height, width, 3), 20, np.uint8)
    cv2.circle(image, (width // 2, height // 2), radius, (235, 235, 235), -1, lineType=cv2.LINE_AA)
    return image


def disc_box(image: np.ndarray) -> tuple[int, int]:
    # OpenCV's stubs type src2 as an array only; compare() takes a scalar too, as its docs say.
    bright = cv2.compare(image[:, :, 0], 128, cv2.CMP_GT)  # type: ignore[call-overload]
    _x, _y, w, h = cv2.boundingRect(bright)
    return w, h


@pytest.mark.parametrize(
    ("source", "params", "expected"),
    [
        ((1024, 1024), ResizeParams(), (832, 480)),
        ((1024, 1536), ResizeParams(), (480, 832)),
        ((1536, 1024), ResizeParams(), (832, 480)),
        ((1024, 1536), ResizeParams(orientation="fixed"), (832, 480)),
        ((1024, 1024), ResizeParams(square=True), (624, 624)),
        ((1100, 1000), ResizeParams(square=True), (624, 624)),
        ((1216, 832), ResizeParams(square=True), (832, 480)),  # 1.46:1 is nearer 1.73:1 than 1:1 (log scale)
        ((1400, 1000), ResizeParams(square=True), (832, 480)),  # 1.4:1 is nearer 1.73:1
        ((1000, 1400), ResizeParams(square=True), (480, 832)),
        ((1024, 1024), ResizeParams(width=1280, height=720, square=True), (960, 960)),
        ((1024, 1024), ResizeParams(width=1280, height=704, multiple=32, square=True), (960, 960)),
        ((704, 1280), ResizeParams(width=1280, height=704, multiple=32), (704, 1280)),
        ((500, 500), ResizeParams(width=480, height=832), (832, 480)),  # auto: the given size is not an orientation
    ],
)
def test_target_size(source: tuple[int, int], params: ResizeParams, expected: tuple[int, int]) -> None:
    assert target_size(*source, params) == expected


@pytest.mark.parametrize("size", [(1024, 640), (640, 1024), (704, 400), (1152, 640), (720, 1280), (832, 480)])
def test_a_square_source_gets_a_landscape_frame_whatever_the_size(size: tuple[int, int]) -> None:
    # Both orientations are equally far from 1:1; the tie must not be broken by the last bit of a logarithm.
    landscape = (max(size), min(size))
    assert target_size(1024, 1024, ResizeParams(width=size[0], height=size[1])) == landscape


def test_every_landscape_target_given_as_portrait_gives_a_square_source_a_landscape_frame() -> None:
    every = [(w, h) for w in range(16, 2049, 16) for h in range(16, w, 16)]
    assert [(w, h) for w, h in every if target_size(1000, 1000, ResizeParams(width=h, height=w)) != (w, h)] == []


def test_cover_crops_the_centre_of_a_wide_source() -> None:
    # Red encodes the column: 1600x480 to 832x480 keeps columns 384..1215.
    image = np.zeros((480, 1600, 3), np.uint8)
    image[:, :, 0] = (np.arange(1600)[None, :] * 255 // 1599).astype(np.uint8)
    out = resize(image, params=ResizeParams())
    assert abs(int(out[240, 0, 0]) - 384 * 255 // 1599) <= 1
    assert abs(int(out[240, -1, 0]) - 1215 * 255 // 1599) <= 1


def test_near_square_boundary_is_where_the_crop_is_equal() -> None:
    # 832x480 vs 624x624: the crop is the same for an aspect of sqrt(832/480) ~ 1.3166.
    params = ResizeParams(square=True)
    assert target_size(1310, 1000, params) == (624, 624)
    assert target_size(1325, 1000, params) == (832, 480)
    assert target_size(1000, 1310, params) == (624, 624)
    assert target_size(1000, 1325, params) == (480, 832)


@pytest.mark.parametrize("square", [False, True])
def test_auto_targets_keep_the_alignment(square: bool) -> None:
    for multiple, size in ((16, (832, 480)), (16, (1280, 720)), (32, (1280, 704))):
        params = ResizeParams(width=size[0], height=size[1], multiple=multiple, square=square)
        for source in ((1024, 1024), (640, 1000), (1000, 640), (3000, 500)):
            width, height = target_size(*source, params)
            assert width % multiple == 0 and height % multiple == 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("orientation", ["auto", "fixed"])
@pytest.mark.parametrize("source", [(1024, 1024), (451, 300), (300, 451), (2000, 333), (833, 481), (832, 480)])
def test_exact_output_size(mode: str, orientation: str, source: tuple[int, int]) -> None:
    params = ResizeParams(mode=mode, orientation=orientation, square=True)  # type: ignore[arg-type]
    image = np.random.default_rng(1).integers(0, 256, (source[1], source[0], 3), dtype=np.uint8)
    out = resize(image, params=params)
    width, height = target_size(*source, params)
    assert out.shape == (height, width, 3)
    assert out.dtype == np.uint8 and out.flags.c_contiguous


@settings(max_examples=40, deadline=None)
@given(
    width=st.integers(1, 700),
    height=st.integers(1, 700),
    mode=st.sampled_from(MODES),
    square=st.booleans(),
)
def test_any_source_gets_the_target_size(width: int, height: int, mode: str, square: bool) -> None:
    params = ResizeParams(width=64, height=32, mode=mode, square=square)  # type: ignore[arg-type]
    out = resize(np.zeros((height, width, 3), np.uint8), params=params)
    assert out.shape[1::-1] == target_size(width, height, params)


@pytest.mark.parametrize("mode", ["cover", "contain"])
@pytest.mark.parametrize("source", [(1024, 1024), (600, 400), (400, 600), (1500, 700)])
def test_cover_and_contain_keep_the_aspect_ratio(mode: str, source: tuple[int, int]) -> None:
    radius = min(source) // 4
    out = resize(disc_image(*source, radius), params=ResizeParams(mode=mode))  # type: ignore[arg-type]
    w, h = disc_box(out)
    assert abs(w - h) <= 2, f"disc became {w}x{h}"


def test_stretch_does_distort() -> None:
    # The check above can fail: stretch squeezes a disc from a square source into 832x480.
    w, h = disc_box(resize(disc_image(1024, 1024, 256), params=ResizeParams(mode="stretch")))
    assert w > 1.5 * h


def test_cover_crops_the_centre() -> None:
    image = np.zeros((1024, 1024, 3), np.uint8)
    image[:, :, 0] = np.arange(1024, dtype=np.uint16)[:, None] // 4  # red encodes the row
    out = resize(image, params=ResizeParams())
    # 480/832 of 1024 rows survive, centred: about rows 217..807 of the source.
    assert abs(int(out[0, 400, 0]) - 217 // 4) <= 1
    assert abs(int(out[-1, 400, 0]) - 806 // 4) <= 1


def test_contain_pads_with_the_rule_colour() -> None:
    image = np.full((1000, 1000, 3), 200, np.uint8)
    out = resize(image, params=ResizeParams(mode="contain", pad=(10, 20, 30)))
    assert out.shape == (480, 832, 3)
    assert (out[:, :100] == (10, 20, 30)).all() and (out[:, -100:] == (10, 20, 30)).all()
    assert (out[:, 200:600] == 200).all()


def _amplitude(frequency: float, width: int) -> float:
    """Share of a horizontal sinusoid's amplitude (cycles per source pixel) left after shrinking 1024 px to `width`."""
    wave = 128 + 100 * np.sin(2 * np.pi * frequency * np.arange(1024) + 0.3)
    image = np.dstack([np.tile(np.round(wave), (64, 1)).astype(np.uint8)] * 3)
    out = resize(image, params=ResizeParams(width=width, height=32, multiple=1, mode="stretch", orientation="fixed"))
    return float(out[16, :, 0].std() * np.sqrt(2) / 100)


def _area_amplitude(frequency: float, width: int) -> float:
    wave = 128 + 100 * np.sin(2 * np.pi * frequency * np.arange(1024) + 0.3)
    image = np.tile(np.round(wave), (64, 1)).astype(np.uint8)
    return float(cv2.resize(image, (width, 32), interpolation=cv2.INTER_AREA)[16].std() * np.sqrt(2) / 100)


@pytest.mark.parametrize("width", [832, 592, 416, 304])  # ratios 0.81, 0.58, 0.41 (integer 3x), 0.30
def test_downscale_lets_through_no_more_aliasing_than_the_area_filter(width: int) -> None:
    nyquist = width / 1024 / 2  # finer source detail than this cannot exist in the output: it aliases
    for frequency in np.linspace(nyquist + 0.02, 0.49, 6):
        assert _amplitude(frequency, width) <= _area_amplitude(frequency, width) + 0.02, frequency


@pytest.mark.parametrize("width", [832, 592, 416, 304])
def test_downscale_keeps_coarse_detail(width: int) -> None:
    frequency = width / 1024 / 8  # a quarter of the output's Nyquist frequency
    assert _amplitude(frequency, width) >= 0.9 * _area_amplitude(frequency, width)


def test_downscale_of_photos_is_close_to_the_area_filter(photos: dict[str, np.ndarray]) -> None:
    for name, photo in photos.items():
        source = cv2.resize(photo, (1024, 1024), interpolation=cv2.INTER_CUBIC)
        out = resize(source, params=ResizeParams())
        area = cv2.resize(source[216:807], (832, 480), interpolation=cv2.INTER_AREA)  # the centred 1024x591
        assert out.shape == area.shape, name
        assert np.abs(out.astype(np.int16) - area).mean() < 1.0, name  # measured 0.18-0.62


def test_downscale_at_an_integer_ratio_is_the_area_filter() -> None:
    image = np.random.default_rng(2).integers(0, 256, (960, 1664, 3), dtype=np.uint8)
    expected = cv2.resize(image, (832, 480), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(resize(image, params=ResizeParams(orientation="fixed")), expected)


def test_downscale_does_not_alias_a_fine_pattern() -> None:
    checker = np.dstack([((np.indices((591, 1024)).sum(axis=0) % 2) * 255).astype(np.uint8)] * 3)
    out = resize(checker, params=ResizeParams(orientation="fixed"))
    nearest = cv2.resize(checker, (832, 480), interpolation=cv2.INTER_NEAREST)
    assert nearest.std() > 100  # what aliasing looks like: the full contrast survives as a false pattern
    assert out.std() < 0.25 * nearest.std()


def test_upscale_is_lanczos() -> None:
    image = np.random.default_rng(3).integers(0, 256, (240, 416, 3), dtype=np.uint8)
    expected = cv2.resize(image, (832, 480), interpolation=cv2.INTER_LANCZOS4)
    np.testing.assert_array_equal(resize(image, params=ResizeParams()), expected)


def test_same_size_is_a_copy() -> None:
    image = np.random.default_rng(4).integers(0, 256, (480, 832, 3), dtype=np.uint8)
    out = resize(image, params=ResizeParams())
    np.testing.assert_array_equal(out, image)
    assert not np.shares_memory(out, image)


def test_input_is_not_modified(photo: np.ndarray) -> None:
    before = photo.copy()
    resize(photo, params=ResizeParams())
    np.testing.assert_array_equal(photo, before)


@pytest.mark.parametrize(
    "kwargs",
    [{"width": 830}, {"height": 0}, {"width": 1280, "height": 720, "multiple": 32}, {"mode": "fill"}, {"pad": (0, 0)}],
)
def test_bad_parameters_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ResizeParams(**kwargs)  # type: ignore[arg-type]


def test_bad_images_are_refused() -> None:
    with pytest.raises(ValueError, match="image"):
        resize(np.zeros((10, 10), np.uint8), params=ResizeParams())
    with pytest.raises(ValueError, match="image"):
        resize(np.zeros((10, 10, 3), np.float32), params=ResizeParams())
