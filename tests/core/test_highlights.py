"""core.highlights: small near-white specular spots on darker surroundings are pulled toward them."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from core.highlights import HighlightParams, find_highlights, tame_highlights

PARAMS = HighlightParams()
GLINTS = ((40, 50), (100, 200), (150, 80), (60, 260))
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def plain_tame(image: np.ndarray, params: HighlightParams) -> tuple[np.ndarray, np.ndarray]:
    """The rule of core.highlights applied spot by spot on the whole frame: what the fast path must equal."""
    out, spots = image.copy(), np.zeros(image.shape[:2], np.float32)
    white = cv2.inRange(image, (params.level,) * 3, (255, 255, 255))
    count, labels, stats, _ = cv2.connectedComponentsWithStatsWithAlgorithm(white, 8, cv2.CV_32S, cv2.CCL_GRANA)
    h, w = white.shape
    r = params.radius
    ids = [i for i in range(1, count) if stats[i, cv2.CC_STAT_AREA] <= params.max_area]
    colours = np.zeros((len(ids), 3), np.float32)
    for n, i in enumerate(ids):
        left, top, width, height, _area = stats[i]
        cols = np.clip([left - r, left + (width - 1) // 2, left + width - 1 + r], 0, w - 1)
        rows = np.clip([top - r, top + (height - 1) // 2, top + height - 1 + r], 0, h - 1)
        ring = [image[rows[j], cols[i]] for j in range(3) for i in range(3) if (j, i) != (1, 1)]
        colours[n] = np.median(np.array(ring, np.float32), axis=0)
    dark = params.level - colours @ LUMA >= params.contrast
    for i, colour, kept in zip(ids, colours, dark, strict=True):
        if not kept:
            continue
        left, top, width, height, _area = stats[i]
        box = np.s_[max(top - 1, 0) : top + height + 1, max(left - 1, 0) : left + width + 1]  # spot and rim
        spot = labels[box] == i
        for part, weight in ((cv2.dilate(spot.view(np.uint8), np.ones((3, 3), np.uint8)) > spot, 0.5), (spot, 1.0)):
            pixels = image[box][part].astype(np.float32)
            moved = pixels + (colour - pixels) * (np.float32(weight) * np.float32(params.strength))
            out[box][part] = (moved + np.float32(0.5)).astype(np.uint8)  # a later spot wins a shared rim pixel
            spots[box][part] = weight
    return out, spots


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


@pytest.mark.parametrize(
    "params", [PARAMS, HighlightParams(strength=0.4), HighlightParams(level=200, max_area=400, contrast=20, radius=3)]
)
def test_real_photos_get_what_the_plain_rule_gives(photos: dict[str, np.ndarray], params: HighlightParams) -> None:
    # The fast path labels only the box of the near-white pixels and gathers whole neighbourhoods at once.
    found = 0
    for image in photos.values():
        tamed, spots = tame_highlights(image, params=params)
        plain_tamed, plain_spots = plain_tame(image, params)
        np.testing.assert_array_equal(spots, plain_spots)
        np.testing.assert_array_equal(tamed, plain_tamed)
        found += int((spots == 1.0).any())
    assert found >= 3


def test_glints_on_the_edges_and_corners() -> None:
    image = np.full((40, 60, 3), 20, np.uint8)
    corners_and_edges = ((0, 0), (0, 57), (37, 0), (37, 57), (0, 30), (18, 0), (37, 20), (20, 57))
    for y, x in corners_and_edges:
        image[y : y + 3, x : x + 3] = 255
    tamed, spots = tame_highlights(image, params=PARAMS)
    assert (spots == 1.0).sum() == 9 * len(corners_and_edges)
    assert (spots[3, 0:4] == 0.5).all() and (spots[0:4, 3] == 0.5).all()  # the rim stops at the frame's edge
    plain_tamed, plain_spots = plain_tame(image, PARAMS)
    np.testing.assert_array_equal(spots, plain_spots)
    np.testing.assert_array_equal(tamed, plain_tamed)


def test_input_is_not_modified() -> None:
    image = glints_on(20)
    before = image.copy()
    tame_highlights(image, params=PARAMS)
    np.testing.assert_array_equal(image, before)


@pytest.mark.parametrize("kwargs", [{"level": 300}, {"max_area": 0}, {"radius": 0}, {"strength": 2.0}])
def test_bad_parameters_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        HighlightParams(**kwargs)  # type: ignore[arg-type]
