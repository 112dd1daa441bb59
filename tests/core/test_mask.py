"""core.mask: threshold, speckle, minimum area, dilation, feathering, coverage guard, blots."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from core.mask import MaskParams, build_mask, nonzero_runs, support_box

SHAPE = (480, 832)
PLAIN = MaskParams(blots=False)


def sinks(*regions: tuple[slice, slice, float], shape: tuple[int, int] = (240, 416)) -> np.ndarray:
    """A work-grid sink score with the given (rows, cols, value) rectangles."""
    values = np.zeros(shape, np.float32)
    for rows, cols, value in regions:
        values[rows, cols] = value
    return values


def test_no_sinks_no_mask() -> None:
    mask = build_mask(np.zeros((240, 416), np.float32), shape=SHAPE, params=MaskParams())
    assert mask.shape == SHAPE and mask.dtype == np.float32 and (mask == 0).all()


def test_scores_at_or_below_the_threshold_are_left_alone() -> None:
    mask = build_mask(sinks((slice(50, 150), slice(50, 150), 0.18)), shape=SHAPE, params=PLAIN)
    assert (mask == 0).all()


def test_a_region_is_covered_and_the_mask_stays_close() -> None:
    params = PLAIN
    mask = build_mask(sinks((slice(60, 120), slice(100, 180), 0.8)), shape=SHAPE, params=params)
    inside = mask[120:240, 200:360]  # the region at output size
    assert inside.min() >= 0.7  # the dilation makes up for most of the feathering, even at corners
    assert inside[8:-8, 8:-8].min() >= 0.99
    reach = params.dilate + 3 * params.feather + 2
    outside = np.ones(SHAPE, bool)
    outside[int(120 - reach) : int(240 + reach), int(200 - reach) : int(360 + reach)] = False
    assert (mask[outside] == 0).all()
    assert 0.0 < mask[120:240, 190].max() < 1.0  # a soft edge, not a cliff


def test_small_regions_and_specks_are_dropped() -> None:
    score = sinks(
        (slice(10, 16), slice(10, 16), 0.9),  # 6x6 on the grid = 144 output pixels < min_area 256
        (slice(100, 101), slice(0, 416), 0.9),  # a one-cell thread, opened away by the speckle filter
        (slice(150, 200), slice(200, 260), 0.9),  # a real region
    )
    mask = build_mask(score, shape=SHAPE, params=PLAIN)
    assert mask[20:32, 20:32].max() == 0.0
    assert mask[200, 0:300].max() == 0.0
    assert mask[308:392, 408:512].min() >= 0.99


def test_min_area_zero_keeps_small_regions() -> None:
    score = sinks((slice(10, 16), slice(10, 16), 0.9))
    mask = build_mask(score, shape=SHAPE, params=MaskParams(blots=False, speckle=0, min_area=0))
    assert mask[20:32, 20:32].min() > 0.75


def test_percentile_mode_follows_the_image_but_never_drops_below_the_threshold() -> None:
    ramp = np.tile(np.linspace(0, 1, 416, dtype=np.float32), (240, 1))
    mask = build_mask(
        ramp, shape=SHAPE, params=MaskParams(mode="percentile", percentile=80, blots=False, max_coverage=1)
    )
    assert mask[:, :600].max() == 0.0 and mask[:, 700:].min() > 0.99
    quiet = np.full((240, 416), 0.1, np.float32)  # all below the absolute floor of 0.18
    assert (build_mask(quiet, shape=SHAPE, params=MaskParams(mode="percentile")) == 0).all()


def test_the_guard_keeps_the_strongest_sinks() -> None:
    score = sinks((slice(0, 240), slice(0, 200), 0.4), (slice(80, 160), slice(260, 360), 0.9))
    mask = build_mask(score, shape=SHAPE, params=MaskParams(blots=False, max_coverage=0.15))
    assert mask.mean() <= 0.15
    assert mask[168:312, 528:712].min() >= 0.99  # the strong region keeps its full blur
    assert mask[:, :300].max() == 0.0  # the weak one gave way


def test_sinks_saturated_over_more_than_the_cap_are_blurred_up_to_it_not_dropped() -> None:
    # A fine weave over 40% of the frame scores 1.0 everywhere in it: no threshold takes a share of it.
    score = sinks((slice(0, 96), slice(0, 416), 1.0), (slice(150, 200), slice(100, 300), 0.5))
    for params in (PLAIN, MaskParams()):
        mask = build_mask(score, shape=SHAPE, params=params)
        assert params.max_coverage / 2 <= mask.mean(dtype=np.float64) <= params.max_coverage
        assert mask[:192].mean() > mask[300:400, 200:600].mean(), "the saturated sinks are blurred the most"


def test_a_scattered_texture_left_in_specks_by_a_tighter_threshold_is_not_dropped() -> None:
    # Over half the frame, scores alternate pixel by pixel: the threshold that would take the cap's share
    # keeps single pixels only, which speckle removal deletes.
    yy, xx = np.mgrid[0:240, 0:416]
    score = np.where(yy < 140, np.where((yy + xx) % 2 == 0, 0.3, 0.6), 0.0).astype(np.float32)
    mask = build_mask(score, shape=SHAPE, params=PLAIN)
    assert PLAIN.max_coverage / 2 <= mask.mean(dtype=np.float64) <= PLAIN.max_coverage
    assert mask[300:].max() == 0.0


@settings(max_examples=40, deadline=None)
@given(
    score=arrays(np.float32, st.tuples(st.integers(4, 60), st.integers(4, 60)), elements=st.floats(0, 1, width=32)),
    max_coverage=st.floats(0.0, 1.0),
    blots=st.booleans(),
    mode=st.sampled_from(["absolute", "percentile"]),
)
def test_mask_properties(score: np.ndarray, max_coverage: float, blots: bool, mode: str) -> None:
    params = MaskParams(max_coverage=max_coverage, blots=blots, mode=mode, min_area=16, blot_min_area=64)  # type: ignore[arg-type]
    shape = (score.shape[0] * 2, score.shape[1] * 2)
    mask = build_mask(score, shape=shape, params=params, seed=5)
    assert mask.shape == shape and mask.dtype == np.float32
    assert mask.min() >= 0.0 and mask.max() <= 1.0
    assert mask.mean(dtype=np.float64) <= max_coverage
    assert ((mask == 0) | (mask >= 1 / 255)).all()  # nothing in between "untouched" and one grey level


def test_blots_break_up_large_regions_deterministically() -> None:
    score = sinks((slice(20, 220), slice(20, 396), 0.9))
    params = MaskParams(max_coverage=1.0)
    whole = build_mask(score, shape=SHAPE, params=MaskParams(max_coverage=1.0, blots=False))
    first = build_mask(score, shape=SHAPE, params=params, seed=11)
    again = build_mask(score, shape=SHAPE, params=params, seed=11)
    other = build_mask(score, shape=SHAPE, params=params, seed=12)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert 0.4 * whole.mean() < first.mean() < 0.9 * whole.mean()
    holes = (first[40:440, 40:792] < 0.5).mean()
    assert 0.2 < holes < 0.6  # irregular blots, not a thin fringe


def test_small_regions_are_not_broken_into_blots() -> None:
    score = sinks((slice(100, 140), slice(100, 160), 0.9))  # 9600 output pixels < blot_min_area
    with_blots = build_mask(score, shape=SHAPE, params=MaskParams(), seed=3)
    np.testing.assert_array_equal(with_blots, build_mask(score, shape=SHAPE, params=PLAIN))


def test_support_box() -> None:
    values = np.zeros((50, 60), np.float32)
    assert support_box(values) is None
    values[10:20, 30:33] = 0.5
    assert support_box(values) == (10, 20, 30, 33)
    assert support_box(values, margin=5, align=2) == (4, 26, 24, 38)
    assert support_box(values, margin=16, align=4) == (0, 36, 12, 52)
    assert support_box(values, margin=100) == (0, 50, 0, 60)


@settings(max_examples=50, deadline=None)
@given(flags=arrays(np.uint8, st.tuples(st.integers(1, 4), st.integers(1, 40)), elements=st.sampled_from([0, 0, 7])),
       join=st.integers(0, 5))  # fmt: skip
def test_nonzero_runs_join_gaps_of_at_most_join(flags: np.ndarray, join: int) -> None:
    expected: list[list[int]] = []
    for row, line in enumerate(flags):
        for col in np.flatnonzero(line).tolist():
            if expected and expected[-1][0] == row and col - expected[-1][2] <= join:
                expected[-1][2] = col + 1
            else:
                expected.append([row, col, col + 1])
    found = [list(run) for run in zip(*(part.tolist() for part in nonzero_runs(flags, join=join)), strict=True)]
    assert found == expected


@pytest.mark.parametrize(
    "kwargs",
    [{"threshold": 1.5}, {"mode": "median"}, {"max_coverage": -0.1}, {"feather": -1}, {"blot_keep": 0}, {"dilate": -1}],
)
def test_bad_parameters_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        MaskParams(**kwargs)  # type: ignore[arg-type]


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="sinks"):
        build_mask(np.zeros((10, 10), np.float64), shape=(20, 20), params=PLAIN)
    with pytest.raises(ValueError, match="shape"):
        build_mask(np.zeros((10, 10), np.float32), shape=(5, 5), params=PLAIN)


def test_a_region_of_exactly_min_area_is_kept_and_a_smaller_one_dropped() -> None:
    params = MaskParams(blots=False, speckle=0, min_area=256, dilate=0, feather=0.0, max_coverage=1.0)
    # On the work grid (half the output size) 8x8 pixels are 256 output pixels; 8x7 are 224.
    kept = build_mask(sinks((slice(40, 48), slice(40, 48), 0.9)), shape=SHAPE, params=params)
    dropped = build_mask(sinks((slice(40, 48), slice(40, 47), 0.9)), shape=SHAPE, params=params)
    assert kept.max() == 1.0 and dropped.max() == 0.0
