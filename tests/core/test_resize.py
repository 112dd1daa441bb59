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
    _x, _y, w, h = cv2.boundingRect(cv2.compare(image[:, :, 0], 128, cv2.CMP_GT))
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


def test_downscale_is_the_area_filter() -> None:
    image = np.random.default_rng(2).integers(0, 256, (591, 1024, 3), dtype=np.uint8)
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
