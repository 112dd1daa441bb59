"""One image at a time on one thread: the runner's own stage timings, and the floor.

Each sample is one call of `service.runner.process_job`, the code a worker
runs (decode -> core pipeline -> encode -> publish), with the stage timings it
reports itself. Around it, the core functions that `core.pipeline.run` calls
are wrapped with a timer, so the analysis can be told from the mask that the
runner counts with it. The *floor* is measured right after, on the same
source: decode (the codec alone) + resize + encode of the two published images
with the same functions and settings, and nothing else.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from benchmarks.corpus import Source
from benchmarks.machine import median_ms
from core import pipeline
from core.resize import resize
from service import decode, encode
from service.decode import decode_file
from service.encode import encode_png
from service.extras import optional_module
from service.rules import Rule
from service.runner import Job, process_job
from service.settings import Settings

_spng = optional_module("pyspng")

# The functions `core.pipeline.run` composes, timed where it looks them up.
CORE_CALLS = (
    "analyze",
    "build_mask",
    "tame_highlights",
    "selective_blur",
    "render_heatmap",
    "changed_box",
    "energy_map_after",
    "compute_scores",
)
# Columns of the report, in pipeline order; "analysis" without the mask, "mask_blur" with it.
STAGES = ("decode", "resize", "analysis", "mask_blur", "heatmap", "scores", "encode", "publish")
CODEC_STAGES = ("decode", "encode")
RUNNER_LIMITS = Settings.model_fields


@dataclass(frozen=True)
class Sample:
    source: Source
    runner: dict[str, float]  # the runner's timings (seconds), as it reports them
    calls: dict[str, float]  # seconds spent in each core function
    job: float  # wall time of the whole process_job call
    floor: dict[str, float]  # decode, resize, encode (seconds)

    @property
    def stages(self) -> dict[str, float]:
        """The report's stages (seconds): the runner's, with the mask moved from analysis to blur."""
        r = self.runner
        mask = self.calls.get("build_mask", 0.0)
        known = {
            "decode": r.get("decode", 0.0),
            "resize": r.get("resize", 0.0),
            "analysis": r.get("analysis", 0.0) - mask,
            "mask_blur": r.get("blur", 0.0) + mask,
            "heatmap": r.get("heatmap", 0.0),
            "scores": r.get("scores", 0.0),
            "encode": r.get("encode", 0.0),
            "publish": r.get("publish", 0.0),
        }
        counted = {"decode", "resize", "analysis", "blur", "heatmap", "scores", "encode", "publish"}
        # A stage the runner gained since this was written still counts, as "other".
        known["other"] = sum(v for k, v in r.items() if k not in counted)
        return known

    @property
    def pipeline(self) -> float:
        """Decode to encode: everything but publishing (seconds)."""
        return sum(v for k, v in self.runner.items() if k != "publish")

    @property
    def between(self) -> float:
        """Everything between decode and encode (seconds)."""
        return sum(v for k, v in self.runner.items() if k not in ("decode", "encode", "publish"))


def measure(sources: Sequence[Source], *, rule: Rule, queue: Path, reps: int, plain: bool = False) -> list[Sample]:
    """`reps` rounds over `sources`, each job followed by its floor on the same source.

    ``plain``: the PNG codecs of a plain install, as without the `fast` extra.
    """
    cv2.setNumThreads(1)  # as the workers do (service/pool.py)
    with plain_codecs() if plain else nullcontext():
        outputs = {s.path: _outputs(s, rule) for s in sources}
        _sample(sources[0], rule, queue, "warmup", outputs[sources[0].path])
        return [
            _sample(source, rule, queue, f"r{rep}", outputs[source.path]) for rep in range(reps) for source in sources
        ]


def fast_codecs() -> bool:
    """Whether the `fast` extra's codecs are installed and in use."""
    return codec_names() == {"encode": "fpng", "decode": "pyspng"}


def codec_names() -> dict[str, str]:
    """The PNG encoder and decoder in use."""
    return {"encode": encode.PNG_ENCODER, "decode": decode.PNG_DECODER}


@contextmanager
def plain_codecs() -> Iterator[None]:
    """A plain install's PNG codecs (without the `fast` extra) while the block runs: OpenCV decodes, the zlib
    writer encodes."""
    saved = encode.PNG_ENCODER, decode.PNG_DECODER
    encode.PNG_ENCODER, decode.PNG_DECODER = "zlib", "opencv"
    try:
        yield
    finally:
        encode.PNG_ENCODER, decode.PNG_DECODER = saved


def summarise(samples: Sequence[Sample]) -> dict[str, dict[str, Any]]:
    """Median milliseconds per stage and the ratios, per group (format and size)."""
    groups: dict[str, list[Sample]] = {}
    for sample in samples:
        groups.setdefault(sample.source.group, []).append(sample)
    return {group: _summary(items) for group, items in groups.items()}


def _summary(samples: list[Sample]) -> dict[str, Any]:
    stages = {name: median_ms([s.stages[name] for s in samples]) for name in (*STAGES, "other")}
    calls = {name: median_ms([s.calls[name] for s in samples if name in s.calls]) for name in CORE_CALLS}
    pipeline_ms = median_ms([s.pipeline for s in samples])
    floor_ms = median_ms([sum(s.floor.values()) for s in samples])
    codec_ms = median_ms([s.runner.get("decode", 0.0) + s.runner.get("encode", 0.0) for s in samples])
    between_ms = median_ms([s.between for s in samples])
    core_ms = median_ms([s.between - s.runner.get("scores", 0.0) for s in samples])
    return {
        "images": len({s.source.path for s in samples}),
        "samples": len(samples),
        "source_mb": round(statistics.median(s.source.megabytes for s in samples), 2),
        "stages_ms": stages,
        "core_calls_ms": calls,
        "mask_split": all("build_mask" in s.calls for s in samples),
        "pipeline_ms": pipeline_ms,
        "job_ms": median_ms([s.job for s in samples]),
        "floor_ms": floor_ms,
        "floor_stages_ms": {k: median_ms([s.floor[k] for s in samples]) for k in ("decode", "resize", "encode")},
        "pipeline_over_floor": pipeline_ms / floor_ms,
        "codec_ms": codec_ms,
        "between_ms": between_ms,
        # Issue 3: everything between decode and encode over decode + encode.
        "between_over_codec": between_ms / codec_ms,
        "resize_to_heatmap_over_codec": core_ms / codec_ms,
        # The resize alone, which every way of doing the job needs: a floor under between / codec.
        "resize_over_codec": stages["resize"] / codec_ms,
    }


def _outputs(source: Source, rule: Rule) -> tuple[np.ndarray, np.ndarray]:
    """The cleaned frame and heatmap the pipeline publishes for `source` (what the floor encodes)."""
    decoded = _decode(source, rule)
    result = pipeline.run(decoded.rgb, rule.to_params())
    return result.cleaned, result.heatmap


def job_seconds(source: Source, *, rule: Rule, queue: Path, tag: str, plain: bool = False) -> float:
    """Wall time of one `process_job` on `source` (the peers' yardstick); ``plain`` as in `measure`."""
    with plain_codecs() if plain else nullcontext():
        started = time.perf_counter()
        outcome = process_job(_job(source, rule, queue, tag))
        elapsed = time.perf_counter() - started
    if outcome.status != "published":
        raise RuntimeError(f"{source.path.name} was not published: {outcome.status} {outcome.error}")
    return elapsed


def _job(source: Source, rule: Rule, queue: Path, tag: str) -> Job:
    return Job(
        source=source.path,
        key=source.path.name,
        # The suffix too: a JPEG and a PNG of one photo and size are two sources, and one's frame is not the other's.
        name=f"{source.path.name.replace('.', '-')}-{tag}",
        rule=rule,
        queue=queue,
        max_bytes=RUNNER_LIMITS["max_bytes"].default,
        max_pixels=RUNNER_LIMITS["max_pixels"].default,
    )


def _sample(source: Source, rule: Rule, queue: Path, tag: str, outputs: tuple[np.ndarray, np.ndarray]) -> Sample:
    with timed_core_calls() as calls:
        started = time.perf_counter()
        outcome = process_job(_job(source, rule, queue, tag))
        elapsed = time.perf_counter() - started
    if outcome.status != "published":
        raise RuntimeError(f"{source.path.name} was not published: {outcome.status} {outcome.error}")
    return Sample(source, dict(outcome.timings), dict(calls), elapsed, _floor(source, rule, outputs))


def _floor(source: Source, rule: Rule, outputs: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
    started = time.perf_counter()
    rgb = bare_decode(source.path.read_bytes(), source.format)
    decoded_at = time.perf_counter()
    resize(rgb, params=rule.to_params().resize)
    resized_at = time.perf_counter()
    for image in outputs:
        encode_png(image)
    encoded_at = time.perf_counter()
    return {"decode": decoded_at - started, "resize": resized_at - decoded_at, "encode": encoded_at - resized_at}


def bare_decode(data: bytes, image_format: str) -> np.ndarray:
    """The codec alone on a file's bytes, as the floor decodes: libspng for a PNG where sinkwatch hands it to
    libspng, else OpenCV. Sinkwatch's hash, container walk and guards are its own work, in its decode stage.

    Always at full scale: the runner decodes a JPEG at reduced scale only from twice the target on, and the
    corpus's JPEGs (`benchmarks.corpus.OTHER_FORMAT_SIZE`) are smaller.
    """
    if image_format == "PNG" and decode.PNG_DECODER == "pyspng" and _spng is not None:
        pixels: np.ndarray = _spng.load(data, "RGB")
        return pixels
    return cv2_decode(data)


def cv2_decode(data: bytes) -> np.ndarray:
    rgb = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
    if rgb is None:
        raise ValueError("OpenCV cannot decode a corpus image")
    return rgb


def _decode(source: Source, rule: Rule) -> Any:
    return decode_file(
        source.path,
        max_bytes=RUNNER_LIMITS["max_bytes"].default,
        max_pixels=RUNNER_LIMITS["max_pixels"].default,
        background=rule.output.background,
    )


@contextmanager
def timed_core_calls() -> Iterator[dict[str, float]]:
    """Seconds spent in each of `CORE_CALLS` while the block runs (a name core no longer uses is left out)."""
    spent: dict[str, float] = {}
    originals = {name: getattr(pipeline, name) for name in CORE_CALLS if hasattr(pipeline, name)}
    for name, function in originals.items():
        setattr(pipeline, name, _timer(name, function, spent))
    try:
        yield spent
    finally:
        for name, function in originals.items():
            setattr(pipeline, name, function)


def _timer(name: str, function: Callable[..., Any], spent: dict[str, float]) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - started

    return timed
