"""core.highlights: small near-white specular spots on darker surroundings are pulled toward them."""

from __future__ import annotations

import numpy as np
import pytest

from core.highlights import HighlightParams, find_highlights, tame_highlights

PARAMS = HighlightParams()
GLINTS = ((40, 50), (100, 200), (150, 80), (60, 260))


def glints_on(background: int, *, size: int = 3, value: int = 255) -> np.ndarray:
    image = np.full((200, 320, 3), background, np.uint8)
    for y, x in GLINTS:
        image[y : y + size, x : x + size] = value
    return image


def test_glints_on_a_dark_field_are_found_and_tamed() -> None:
    image = glints_on(20)
    tamed, spots = tame_highlights(image, params=PARAMS)
    for y, x in GLINTS:
        assert (spots[y : y + 3, x : x + 3] == 1.0).all()
        # 255 moves 60% of the way to 20: about 114.
        assert abs(int(tamed[y + 1, x + 1, 0]) - round(255 - 0.6 * 235)) <= 1
    assert spots.sum() < 4 * (5 * 5)  # the spots and a one-pixel rim, nothing else
    np.testing.assert_array_equal(tamed[spots == 0], image[spots == 0])


def test_the_rim_moves_half_as_far() -> None:
    image = glints_on(20)
    image[39, 50:53] = 180  # an anti-aliased upper edge of the first glint, not near-white itself
    tamed, spots = tame_highlights(image, params=PARAMS)
    assert spots[39, 51] == 0.5
    assert abs(int(tamed[39, 51, 0]) - round(180 - 0.3 * 160)) <= 1


def test_find_highlights_is_the_mask_alone() -> None:
    image = glints_on(20)
    np.testing.assert_array_equal(find_highlights(image, params=PARAMS), tame_highlights(image, params=PARAMS)[1])


def test_a_large_white_area_is_a_surface_not_a_glint() -> None:
    image = np.full((200, 320, 3), 20, np.uint8)
    image[50:100, 50:120] = 255
    tamed, spots = tame_highlights(image, params=PARAMS)
    assert (spots == 0).all()
    np.testing.assert_array_equal(tamed, image)


def test_white_spots_on_bright_surroundings_stay() -> None:
    tamed, spots = tame_highlights(glints_on(210), params=PARAMS)
    assert (spots == 0).all()
    np.testing.assert_array_equal(tamed, glints_on(210))


def test_coloured_highlights_are_not_near_white() -> None:
    image = np.full((200, 320, 3), 20, np.uint8)
    image[40:43, 50:53] = (255, 255, 120)  # bright yellow: a colour, not a specular white
    assert (find_highlights(image, params=PARAMS) == 0).all()


def test_the_off_switch() -> None:
    image = glints_on(20)
    tamed, spots = tame_highlights(image, params=HighlightParams(enabled=False))
    np.testing.assert_array_equal(tamed, image)
    assert (spots == 0).all()


def test_strength_zero_finds_but_does_not_change() -> None:
    image = glints_on(20)
    tamed, spots = tame_highlights(image, params=HighlightParams(strength=0.0))
    np.testing.assert_array_equal(tamed, image)
    assert spots.max() == 1.0


def test_glints_in_a_real_photo_get_darker(photos: dict[str, np.ndarray]) -> None:
    image = photos["coffee"]  # the spoon and the saucer carry specular glints
    tamed, spots = tame_highlights(image, params=PARAMS)
    core = spots == 1.0
    assert core.sum() > 20
    assert tamed[core].mean() < image[core].mean() - 20
    np.testing.assert_array_equal(tamed[spots == 0], image[spots == 0])


def test_input_is_not_modified() -> None:
    image = glints_on(20)
    before = image.copy()
    tame_highlights(image, params=PARAMS)
    np.testing.assert_array_equal(image, before)


@pytest.mark.parametrize("kwargs", [{"level": 300}, {"max_area": 0}, {"radius": 0}, {"strength": 2.0}])
def test_bad_parameters_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        HighlightParams(**kwargs)  # type: ignore[arg-type]
