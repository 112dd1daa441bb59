"""The per-image pipeline: one explicit, ordered composition, timed in one place.

resize -> analysis (Matrix Vision map, sink score, mask) -> blur (highlight
taming, selective blur) -> heatmap -> scores (map of the cleaned frame, SSIM).
Deterministic: the same pixels and parameters give byte-identical outputs
(the blot noise is seeded from the resized frame's content).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from core.blur import BlurParams, selective_blur
from core.frequency import AnalysisParams, analyze, energy_map_after
from core.heatmap import HeatmapParams, render_heatmap
from core.highlights import HighlightParams, tame_highlights
from core.mask import MaskParams, build_mask
from core.resize import ResizeParams, resize
from core.scores import Scores, changed_box, compute_scores

# Grey gap between the panels of a preview.
_GAP = 8
_GAP_GREY = 64


@dataclass(frozen=True)
class PipelineParams:
    """Everything one rule decides, one frozen dataclass per stage."""

    resize: ResizeParams = field(default_factory=ResizeParams)
    analysis: AnalysisParams = field(default_factory=AnalysisParams)
    mask: MaskParams = field(default_factory=MaskParams)
    blur: BlurParams = field(default_factory=BlurParams)
    highlights: HighlightParams = field(default_factory=HighlightParams)
    heatmap: HeatmapParams = field(default_factory=HeatmapParams)


@dataclass(frozen=True)
class PipelineResult:
    """resized, cleaned, heatmap : RGB uint8 (H, W, 3) at output size.
    energy_before, energy_after : Matrix Vision maps (float32 (H, W), 0..1)
        of the resized and the cleaned frame.
    mask : the soft sink mask (float32 (H, W), 0..1).
    timings : seconds per stage: resize, analysis, blur, heatmap, scores.
    """

    resized: np.ndarray
    cleaned: np.ndarray
    energy_before: np.ndarray
    energy_after: np.ndarray
    mask: np.ndarray
    heatmap: np.ndarray
    scores: Scores
    timings: Mapping[str, float]


def run(image: np.ndarray, params: PipelineParams, *, clock: Callable[[], float] = time.perf_counter) -> PipelineResult:
    """Clean one RGB ``uint8`` image: the whole per-image pipeline."""
    timings: dict[str, float] = {}
    started = clock()

    def lap(stage: str) -> None:
        nonlocal started
        now = clock()
        timings[stage] = now - started
        started = now

    resized = resize(image, params=params.resize)
    lap("resize")
    analysis = analyze(resized, params=params.analysis)
    mask = build_mask(analysis.sinks, shape=resized.shape, params=params.mask, seed=content_seed(resized))
    lap("analysis")
    tamed, spots = tame_highlights(resized, params=params.highlights)
    cleaned = selective_blur(tamed, mask, params=params.blur, energy=analysis.raw, analysis=params.analysis)
    lap("blur")
    heatmap = render_heatmap(analysis.energy, params=params.heatmap, mask=mask)
    lap("heatmap")
    # The blur and the highlights touch a part of the frame: the map after and the SSIM need only that part.
    changed = changed_box(resized, cleaned)
    energy_after = energy_map_after(cleaned, before=analysis.energy, changed=changed, params=params.analysis)
    scores = compute_scores(
        resized,
        cleaned,
        energy_before=analysis.energy,
        energy_after=energy_after,
        mask=mask,
        highlights=spots,
        changed=changed,
    )
    lap("scores")
    return PipelineResult(
        resized=resized,
        cleaned=cleaned,
        energy_before=analysis.energy,
        energy_after=energy_after,
        mask=mask,
        heatmap=heatmap,
        scores=scores,
        timings=timings,
    )


def preview(result: PipelineResult, *, params: HeatmapParams | None = None) -> np.ndarray:
    """Side by side: resized | Matrix Vision | cleaned | Matrix Vision after (RGB ``uint8``).

    ``params`` styles the "after" map (default: glow with the mask outline),
    so that it matches the heatmap the rule rendered.
    """
    after = render_heatmap(result.energy_after, params=params or HeatmapParams(), mask=result.mask)
    h = result.resized.shape[0]
    gap = np.full((h, _GAP, 3), _GAP_GREY, np.uint8)
    return np.hstack([result.resized, gap, result.heatmap, gap, result.cleaned, gap, after])


def content_seed(image: np.ndarray) -> int:
    """A seed derived from the pixels (a coarse sample), for noise that belongs to the image."""
    return zlib.crc32(np.ascontiguousarray(image[::8, ::8]).tobytes())
