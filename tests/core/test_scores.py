"""core.scores: SSIM as scikit-image computes it, energy before/after, coverage."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.metrics import structural_similarity

from core.scores import Scores, changed_box, compute_scores, percentile, ssim

REQUIRED = {
    "width", "height", "mask_coverage", "energy_mean_before", "energy_mean_after", "energy_p95_before",
    "energy_p95_after", "sink_energy_before", "sink_energy_after", "ssim",
}  # fmt: skip


def reference(first: np.ndarray, second: np.ndarray) -> float:
    grey = [cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) for image in (first, second)]
    return float(
        structural_similarity(*grey, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
    )


def noisy(seed: int, shape: tuple[int, int] = (120, 160)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def test_identical_images_score_one() -> None:
    image = noisy(0)
    assert ssim(image, image.copy()) == 1.0


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda image: cv2.GaussianBlur(image, (5, 5), 1.0), id="whole-frame blur"),
        pytest.param(lambda image: noisy(9), id="unrelated"),
        pytest.param(lambda image: np.clip(image.astype(int) + 40, 0, 255).astype(np.uint8), id="brighter"),
    ],
)
def test_ssim_matches_scikit_image(change: object) -> None:
    image = cv2.GaussianBlur(noisy(1), (3, 3), 0.8)
    other = change(image)  # type: ignore[operator]
    assert ssim(image, other) == pytest.approx(reference(image, other), abs=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    top=st.integers(0, 110),
    left=st.integers(0, 150),
    height=st.integers(1, 30),
    width=st.integers(1, 30),
    value=st.integers(0, 255),
)
def test_local_changes_match_scikit_image_anywhere(top: int, left: int, height: int, width: int, value: int) -> None:
    # Only the neighbourhood of a change is computed; the border and the corners must come out right too.
    image = cv2.GaussianBlur(noisy(2), (3, 3), 0.8)
    other = image.copy()
    other[top : top + height, left : left + width] = value
    assert ssim(image, other) == pytest.approx(reference(image, other), abs=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    spots=st.lists(
        st.tuples(st.integers(0, 119), st.integers(0, 159), st.integers(1, 6), st.integers(1, 6), st.integers(0, 2)),
        min_size=2,
        max_size=12,
    )
)
def test_scattered_changes_match_scikit_image(spots: list[tuple[int, int, int, int, int]]) -> None:
    # Changes far apart are computed as separate runs in bands of rows, in any one channel.
    image = cv2.GaussianBlur(noisy(8), (3, 3), 0.8)
    other = image.copy()
    for top, left, height, width, channel in spots:
        patch = (slice(top, top + height), slice(left, left + width), channel)
        other[patch] = 255 - other[patch]
    assert ssim(image, other) == pytest.approx(reference(image, other), abs=1e-6)


def test_changes_in_the_corners_and_on_the_edges_match_scikit_image() -> None:
    image = cv2.GaussianBlur(noisy(10), (3, 3), 0.8)
    other = image.copy()
    for row, col in [(0, 0), (0, 159), (119, 0), (119, 159), (0, 80), (60, 0), (119, 80), (60, 159), (60, 80)]:
        other[row, col] = 255 - other[row, col]
    assert ssim(image, other) == pytest.approx(reference(image, other), abs=1e-6)


@pytest.mark.parametrize("channel", [0, 1, 2])
def test_the_changed_box_holds_exactly_the_changed_pixels(channel: int) -> None:
    image = noisy(7)
    other = image.copy()
    other[30, 40, channel] ^= 1
    other[70:75, 100, channel] ^= 1
    assert changed_box(image, other) == (30, 75, 40, 101)
    assert changed_box(image, image.copy()) == (0, 0, 0, 0)


def test_a_known_changed_box_gives_the_same_ssim(photos: dict[str, np.ndarray]) -> None:
    image = cv2.resize(photos["coffee"], (832, 480), interpolation=cv2.INTER_AREA)
    other = image.copy()
    other[100:200, 300:500] = cv2.GaussianBlur(image, (5, 5), 1.2)[100:200, 300:500]
    box = changed_box(image, other)
    assert ssim(image, other, changed=box) == ssim(image, other) < 1.0
    assert ssim(image, other, changed=box) == pytest.approx(reference(image, other), abs=1e-6)


def test_percentile_is_close_to_numpy() -> None:
    values = cv2.resize(np.random.default_rng(3).random((60, 80), dtype=np.float32), (160, 120))
    assert percentile(values, 95) == pytest.approx(float(np.percentile(values, 95)), abs=0.01)


def test_scores_of_a_cleaning() -> None:
    image = noisy(4)
    cleaned = image.copy()
    cleaned[:, :80] = cv2.GaussianBlur(image, (5, 5), 1.0)[:, :80]
    mask = np.zeros((120, 160), np.float32)
    mask[:, :80] = 1.0
    before = np.full((120, 160), 0.5, np.float32)
    after = before.copy()
    after[:, :80] = 0.2
    scores = compute_scores(image, cleaned, energy_before=before, energy_after=after, mask=mask)
    assert (scores.width, scores.height) == (160, 120)
    assert scores.mask_coverage == pytest.approx(0.5)
    assert scores.energy_mean_before == pytest.approx(0.5) and scores.energy_mean_after == pytest.approx(0.35)
    assert scores.sink_energy_before == pytest.approx(0.5) and scores.sink_energy_after == pytest.approx(0.2)
    assert scores.sink_energy_reduction == pytest.approx(0.6)
    assert scores.energy_p95_before == pytest.approx(0.5) and scores.energy_p95_after == pytest.approx(0.5)
    assert scores.ssim == pytest.approx(reference(image, cleaned), abs=1e-6)
    values = scores.as_dict()
    assert values.keys() >= REQUIRED and all(isinstance(v, float) for v in values.values())


def test_an_empty_mask_has_no_sink_energy() -> None:
    image = noisy(5)
    zeros = np.zeros((120, 160), np.float32)
    scores = compute_scores(image, image, energy_before=zeros + 0.3, energy_after=zeros + 0.3, mask=zeros)
    assert scores.mask_coverage == 0.0 and scores.sink_energy_before == 0.0 and scores.sink_energy_reduction == 0.0
    assert scores.ssim == 1.0


def test_mismatched_maps_are_refused() -> None:
    image = noisy(6)
    with pytest.raises(ValueError, match="mask"):
        compute_scores(
            image, image, energy_before=np.zeros((120, 160), np.float32),
            energy_after=np.zeros((120, 160), np.float32), mask=np.zeros((12, 16), np.float32),
        )  # fmt: skip
    with pytest.raises(ValueError):
        ssim(image, image[:60])


def test_scores_are_plain_data() -> None:
    scores = Scores(1, 2, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.9)
    assert scores.as_dict()["ssim"] == 0.9 and scores.as_dict()["highlight_coverage"] == 0.0


def test_scores_do_not_depend_on_where_the_maps_lie_in_memory(photos: dict[str, np.ndarray]) -> None:
    # The frame carries its scores, and each run allocates its maps elsewhere: a sum whose last bit followed
    # the allocation changed the frame's bytes from run to run (cv2.sumElems did, on this frame).
    from PIL import Image

    from core.pipeline import run
    from service.rules import load_rules

    image = np.asarray(Image.fromarray(photos["rocket"]).resize((1216, 832), Image.Resampling.LANCZOS))
    params = load_rules(None).get("wan22-5b").to_params()
    assert len({run(image, params).scores for _ in range(40)}) == 1
