"""core.heatmap: white-on-black glow or colour map, optional mask outline; dark where the frame is flat."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from core.frequency import AnalysisParams, energy_map
from core.heatmap import HeatmapParams, render_heatmap
from core.resize import ResizeParams, resize

GLOW = HeatmapParams(outline=False)
COLOUR = HeatmapParams(style="colormap", outline=False)


@pytest.mark.parametrize("params", [GLOW, COLOUR])
def test_no_energy_renders_black(params: HeatmapParams) -> None:
    picture = render_heatmap(np.zeros((48, 64), np.float32), params=params)
    assert picture.shape == (48, 64, 3) and picture.dtype == np.uint8
    assert picture.max() <= 5


def test_glow_is_white_on_black_and_monotone() -> None:
    energy = np.tile(np.linspace(0, 1, 256, dtype=np.float32), (8, 1))
    picture = render_heatmap(energy, params=HeatmapParams(outline=False, halo=0.0))
    assert (picture[..., 0] == picture[..., 1]).all() and (picture[..., 1] == picture[..., 2]).all()
    assert picture[0, -1, 0] == 255 and picture[0, 0, 0] == 0
    assert (np.diff(picture[4, :, 0].astype(int)) >= 0).all()


def test_colormap_runs_from_dark_to_bright() -> None:
    energy = np.tile(np.linspace(0, 1, 256, dtype=np.float32), (8, 1))
    luma = cv2.cvtColor(render_heatmap(energy, params=COLOUR), cv2.COLOR_RGB2GRAY)[4]
    assert luma[0] < 10 and luma[-1] > 200


def test_the_outline_follows_the_mask() -> None:
    mask = np.zeros((100, 120), np.float32)
    mask[30:70, 40:90] = 1.0
    picture = render_heatmap(np.zeros((100, 120), np.float32), params=HeatmapParams(), mask=mask)
    drawn = (picture == HeatmapParams().outline_color).all(axis=2)
    assert drawn[30, 60] and drawn[69, 60] and drawn[50, 40] and drawn[50, 89]
    assert not drawn[50, 65] and not drawn[10, 10]
    plain = render_heatmap(np.zeros((100, 120), np.float32), params=GLOW, mask=mask)
    assert not (plain == HeatmapParams().outline_color).all(axis=2).any()


def test_flat_regions_of_real_photos_are_dark(photo: np.ndarray) -> None:
    frame = resize(photo, params=ResizeParams())
    heat = render_heatmap(energy_map(frame, params=AnalysisParams()), params=GLOW)[..., 0]
    luma = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY).astype(np.float32)
    # Flat: the local standard deviation over 31 px stays under 2 grey levels.
    mean = cv2.blur(luma, (31, 31))
    std = np.sqrt(np.maximum(cv2.blur(luma * luma, (31, 31)) - mean * mean, 0))
    flat, busy = std < 2.0, std > 25.0
    assert flat.sum() > 2000 and busy.sum() > 2000  # every listed photo has both
    assert heat[flat].mean() < 30
    assert heat[busy].mean() > heat[flat].mean() + 30


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="energy"):
        render_heatmap(np.zeros((4, 4), np.float64), params=GLOW)
    with pytest.raises(ValueError, match="mask"):
        render_heatmap(np.zeros((4, 4), np.float32), params=GLOW, mask=np.zeros((3, 3), np.float32))
    for kwargs in ({"style": "fire"}, {"colormap": "jet"}, {"gamma": 0}, {"outline_color": (0, 0)}):
        with pytest.raises(ValueError):
            HeatmapParams(**kwargs)
