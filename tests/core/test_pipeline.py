"""core.pipeline: the acceptance behaviour of the whole per-image pipeline, on synthetic and real frames."""

from __future__ import annotations

import dataclasses
import itertools

import cv2
import numpy as np
import pytest

from core.blur import gaussian
from core.frequency import energy_map
from core.pipeline import PipelineParams, PipelineResult, content_seed, preview, run
from core.scores import ssim

DEFAULT = PipelineParams()
TIMED_STAGES = ("resize", "analysis", "blur", "heatmap", "scores")


def flat_field(value: int = 128) -> np.ndarray:
    return np.full((600, 1040, 3), value, np.uint8)


def with_patch(image: np.ndarray, pattern: str, rows: slice, cols: slice) -> np.ndarray:
    out = image.copy()
    yy, xx = np.mgrid[rows, cols]
    if pattern == "stripes":
        values = np.where((xx // 2) % 2 == 0, 90, 190)
    else:
        values = np.where((yy // 2 + xx // 2) % 2 == 0, 90, 190)
    out[rows, cols] = values[..., None].astype(np.uint8)
    return out


def sink_weighted(energy: np.ndarray, mask: np.ndarray) -> float:
    return float((energy * mask).sum() / mask.sum())


@pytest.fixture(scope="module")
def results(photos: dict[str, np.ndarray]) -> dict[str, PipelineResult]:
    return {name: run(image, DEFAULT) for name, image in photos.items()}


@pytest.mark.parametrize(
    "image",
    [
        pytest.param(flat_field(0), id="black"),
        pytest.param(flat_field(200), id="grey"),
        pytest.param(flat_field(255), id="white"),
        pytest.param(np.dstack([np.tile(np.linspace(10, 250, 1040), (600, 1))] * 3).astype(np.uint8), id="ramp"),
        pytest.param(
            np.dstack([cv2.GaussianBlur(np.random.default_rng(0).random((600, 1040), dtype=np.float32), (0, 0), 40)
                       * 8000 % 256] * 3).astype(np.uint8),
            id="smooth-bands",
        ),
    ],
)  # fmt: skip
def test_flat_and_smooth_frames_are_left_alone(image: np.ndarray) -> None:
    result = run(image, DEFAULT)
    assert result.scores.mask_coverage == 0.0
    assert (result.mask == 0).all()
    np.testing.assert_array_equal(result.cleaned, result.resized)


@pytest.mark.parametrize("pattern", ["stripes", "checker"])
def test_a_fine_patch_on_a_flat_field_is_covered_and_the_mask_stays_close(pattern: str) -> None:
    # The frame is 832x480 already: a 112x112 patch stays a 112x112 patch.
    image = with_patch(np.full((480, 832, 3), 128, np.uint8), pattern, slice(180, 292), slice(360, 472))
    result = run(image, DEFAULT)
    patch = result.mask[180:292, 360:472]
    assert (patch >= 0.5).mean() >= 0.9
    margin = 16
    outside = np.ones(result.mask.shape, bool)
    outside[180 - margin : 292 + margin, 360 - margin : 472 + margin] = False
    assert (result.mask[outside] == 0).all()
    assert (result.cleaned[outside] == result.resized[outside]).all()


def test_a_large_patch_without_blots_is_covered_whole() -> None:
    params = dataclasses.replace(DEFAULT, mask=dataclasses.replace(DEFAULT.mask, blots=False, max_coverage=0.5))
    image = with_patch(np.full((480, 832, 3), 128, np.uint8), "checker", slice(100, 380), slice(200, 600))
    assert (run(image, params).mask[100:380, 200:600] >= 0.5).mean() >= 0.9


def test_a_single_strong_edge_is_not_masked_while_texture_beside_it_is() -> None:
    image = np.full((480, 832, 3), 60, np.uint8)
    image[:, 300:] = 190  # one strong edge between two flat regions
    image = with_patch(image, "stripes", slice(180, 292), slice(560, 672))
    result = run(image, DEFAULT)
    assert result.energy_before[:, 296:304].max() > 0.4  # the map does see the edge...
    assert result.mask[:, 270:330].max() == 0.0  # ...but the mask leaves it alone
    assert (result.mask[180:292, 560:672] >= 0.5).mean() >= 0.9


def test_an_outline_beside_real_texture(photos: dict[str, np.ndarray]) -> None:
    # Fur from chelsea pasted next to a strong edge: the fur is a sink, the edge is not.
    fur = cv2.resize(photos["chelsea"][20:170, 150:300], (140, 140), interpolation=cv2.INTER_AREA)
    image = np.full((480, 832, 3), 50, np.uint8)
    image[:, 416:] = 200
    image[170:310, 240:380] = fur
    result = run(image, DEFAULT)
    assert result.mask[:, 400:432].max() == 0.0
    assert (result.mask[170:310, 240:380] >= 0.5).mean() > 0.5


@pytest.mark.parametrize("share", [0.3, 0.6])
def test_a_fine_weave_over_much_of_a_photo_is_blurred_up_to_the_cap(
    photos: dict[str, np.ndarray], share: float
) -> None:
    image = cv2.resize(photos["astronaut"], (1216, 832), interpolation=cv2.INTER_LANCZOS4)
    rows = int(832 * share)
    yy, xx = np.mgrid[0:rows, 0:1216]
    weave = np.where(np.sin(xx * 2 * np.pi / 5) * np.sin(yy * 2 * np.pi / 5) > 0, 200, 50)
    image[832 - rows :] = weave[..., None].astype(np.uint8)
    scores = run(image, DEFAULT).scores
    cap = DEFAULT.mask.max_coverage
    assert cap / 2 <= scores.mask_coverage <= cap and scores.sink_energy_reduction > 0.1, scores


def test_every_real_photo_meets_the_acceptance_scores(results: dict[str, PipelineResult]) -> None:
    for name, result in results.items():
        s = result.scores
        assert 0.02 <= s.mask_coverage <= 0.35, name
        assert s.ssim >= 0.93, name
        assert s.sink_energy_reduction >= 0.40, name
        # The score is what the maps say: the mean energy under the mask, before and after.
        assert s.sink_energy_reduction == pytest.approx(
            1 - sink_weighted(result.energy_after, result.mask) / sink_weighted(result.energy_before, result.mask),
            abs=1e-4,
        ), name


def test_the_map_after_is_the_map_of_the_cleaned_frame(results: dict[str, PipelineResult]) -> None:
    # The pipeline recomputes the map only around the changes; it must not show.
    for name, result in results.items():
        expected = energy_map(result.cleaned, params=DEFAULT.analysis)
        assert result.energy_after.tobytes() == expected.tobytes(), name
        assert result.scores.ssim == ssim(result.resized, result.cleaned), name


def test_selective_blur_beats_a_global_blur_at_equal_sink_reduction(results: dict[str, PipelineResult]) -> None:
    for name, result in results.items():
        wanted = result.scores.sink_energy_reduction
        before = sink_weighted(result.energy_before, result.mask)
        low, high = 0.1, 8.0  # the weakest global Gaussian that removes as much energy inside the sinks
        for _ in range(12):
            sigma = (low + high) / 2
            blurred = gaussian(result.resized, sigma=sigma)
            reduced = 1 - sink_weighted(energy_map(blurred, params=DEFAULT.analysis), result.mask) / before
            low, high = (low, sigma) if reduced >= wanted else (sigma, high)
        global_ssim = ssim(result.resized, gaussian(result.resized, sigma=high))
        assert result.scores.ssim > global_ssim + 0.01, f"{name}: {result.scores.ssim:.4f} vs {global_ssim:.4f}"


def test_the_same_input_gives_byte_identical_outputs(photos: dict[str, np.ndarray]) -> None:
    first, second = run(photos["china"], DEFAULT), run(photos["china"].copy(), DEFAULT)
    for field in ("resized", "cleaned", "energy_before", "energy_after", "mask", "heatmap"):
        assert getattr(first, field).tobytes() == getattr(second, field).tobytes(), field
    assert first.scores == second.scores
    assert preview(first).tobytes() == preview(second).tobytes()


def test_blots_are_seeded_from_the_content() -> None:
    image = with_patch(np.full((480, 832, 3), 128, np.uint8), "checker", slice(40, 440), slice(100, 700))
    shifted = image.copy()
    shifted[0, 0] = 127  # one pixel elsewhere: another image, other blots
    assert content_seed(image) == content_seed(image.copy()) != content_seed(shifted)
    params = dataclasses.replace(DEFAULT, mask=dataclasses.replace(DEFAULT.mask, max_coverage=1.0))
    assert not np.array_equal(run(image, params).mask, run(shifted, params).mask)


def test_timings_come_from_the_injected_clock() -> None:
    ticks = itertools.count(0.0, 0.5)
    result = run(flat_field(), DEFAULT, clock=lambda: next(ticks))
    assert tuple(result.timings) == TIMED_STAGES
    assert all(seconds == 0.5 for seconds in result.timings.values())


def test_result_shapes_and_types(photos: dict[str, np.ndarray]) -> None:
    portrait = np.ascontiguousarray(np.rot90(photos["coffee"]))
    result = run(portrait, DEFAULT)
    assert result.resized.shape == result.cleaned.shape == result.heatmap.shape == (832, 480, 3)
    for field in ("energy_before", "energy_after", "mask"):
        values = getattr(result, field)
        assert values.shape == (832, 480) and values.dtype == np.float32
        assert values.min() >= 0 and values.max() <= 1
    assert (result.scores.width, result.scores.height) == (480, 832)
    side_by_side = preview(result)
    assert side_by_side.shape == (832, 4 * 480 + 3 * 8, 3) and side_by_side.dtype == np.uint8
    np.testing.assert_array_equal(side_by_side[:, :480], result.resized)
    np.testing.assert_array_equal(side_by_side[:, 2 * 488 : 2 * 488 + 480], result.cleaned)


def test_input_is_not_modified(photos: dict[str, np.ndarray]) -> None:
    image = photos["astronaut"]
    before = image.copy()
    run(image, DEFAULT)
    np.testing.assert_array_equal(image, before)
