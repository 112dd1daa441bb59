"""One benchmark run: the corpus, then each section, into one JSON-ready dict."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import bare, codecs, daemon, machine, peers, procs, single
from benchmarks.corpus import GENERATOR_SIZES, OTHER_FORMAT_SIZE, PHOTOS, Source, build_corpus
from service.rules import Rule, load_rules

SECTIONS = ("single", "peers", "codecs", "daemon")


@dataclass(frozen=True)
class Config:
    photos: tuple[str, ...] = PHOTOS
    sizes: tuple[tuple[int, int], ...] = GENERATOR_SIZES
    other_formats: tuple[str, ...] = ("JPEG", "WEBP")
    other_size: tuple[int, int] = OTHER_FORMAT_SIZE
    reps: int = 3  # rounds over the corpus, single thread
    peer_photos: tuple[str, ...] = PHOTOS  # peers run on these, at the first two sizes
    peer_reps: int = 1
    codec_reps: int = 5
    burst: int = 100  # files per throughput burst
    rounds: int = 3  # of bursts with 1 then 2 workers: one round swings with the neighbours' load
    latency: int = 75  # files at `rate` per second
    rate: float = 5.0
    backlog: int = 2000
    backlog_from: int = 500  # growth is measured from this image on
    idle_seconds: float = 2.0


FULL = Config()
QUICK = Config(
    photos=("astronaut", "coffee"),
    sizes=GENERATOR_SIZES[:2],
    reps=2,
    peer_photos=("astronaut",),
    codec_reps=3,
    burst=12,
    rounds=1,
    latency=10,
    backlog=80,
    backlog_from=20,
    idle_seconds=1.0,
)


def run(
    config: Config, *, sections: Sequence[str] = SECTIONS, progress: Callable[[str], None] = print
) -> dict[str, Any]:
    """Every requested section on a fresh corpus in a temp folder (removed afterwards)."""
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    clock = _Laps()

    def step(message: str) -> None:
        clock.lap(message)
        progress(message)

    report: dict[str, Any] = {"machine": machine.describe(), "config": asdict(config), "started": time.time()}
    rule = load_rules(None).get("default")
    with tempfile.TemporaryDirectory(prefix="sinkwatch-bench-") as temp:
        root = Path(temp)
        step("corpus")
        sources = build_corpus(
            root / "corpus",
            photos=config.photos,
            sizes=config.sizes,
            other_formats=config.other_formats,
            other_size=config.other_size,
        )
        report["corpus"] = {s.path.name: {"group": s.group, "mb": round(s.megabytes, 3)} for s in sources}
        pngs = [s for s in sources if s.format == "PNG"]
        if {"single", "peers", "codecs"} & set(sections):
            with bare.worker_pool(root / "spool") as worker:
                _in_worker(worker, config, sections, sources, rule, root, report, step)
        if "daemon" in sections:
            report["daemon"] = _daemon(config, root, pngs, rule, step)
    clock.lap("end")
    report["machine"]["load_average_end"] = machine.describe()["load_average"]
    report["seconds"] = round(time.time() - report.pop("started"), 1)
    report["step_seconds"] = clock.laps
    return report


def _in_worker(
    worker: ProcessPoolExecutor,
    config: Config,
    sections: Sequence[str],
    sources: list[Source],
    rule: Rule,
    root: Path,
    report: dict[str, Any],
    step: Callable[[str], None],
) -> None:
    pngs = [s for s in sources if s.format == "PNG"]
    report["png_codecs"] = worker.submit(single.codec_names).result()
    if "single" in sections:
        step(f"single image, one thread: {len(sources)} images x {config.reps}")
        samples = worker.submit(single.measure, sources, rule=rule, queue=root / "single", reps=config.reps)
        report["single"] = single.summarise(samples.result())
        if worker.submit(single.fast_codecs).result():
            step(f"single image, one thread, plain codecs: {len(sources)} images x {config.reps}")
            queue = root / "single-plain"
            samples = worker.submit(single.measure, sources, rule=rule, queue=queue, reps=config.reps, plain=True)
            report["single_plain"] = single.summarise(samples.result())
    if "peers" in sections:
        chosen = [s for s in pngs if s.photo in config.peer_photos and s.size in config.sizes[:2]]
        step(f"peers: {len(chosen)} images")
        rows = worker.submit(peers.measure, chosen, rule=rule, folder=root / "peers", reps=config.peer_reps)
        report["peers"] = rows.result()
    if "codecs" in sections:
        chosen = [s for s in pngs if s.size == config.sizes[0]]
        step(f"codecs: {len(chosen)} images")
        found = worker.submit(codecs.measure, chosen, rule=rule, folder=root / "codecs", reps=config.codec_reps)
        report["codecs"] = found.result()


class _Laps:
    """Seconds each step took (a step lasts until the next one starts)."""

    def __init__(self) -> None:
        self.laps: dict[str, dict[str, float]] = {}
        self.current: str | None = None
        self.started = time.monotonic()
        self.busy = procs.machine_busy_seconds()

    def lap(self, name: str) -> None:
        now, busy = time.monotonic(), procs.machine_busy_seconds()
        if self.current is not None:
            wall = now - self.started
            # How many cores the whole machine kept busy meanwhile: ours and everyone else's.
            cores = round((busy - self.busy) / wall, 2)
            self.laps[self.current] = {"seconds": round(wall, 1), "machine_busy_cores": cores}
        self.current, self.started, self.busy = name, now, busy


def _daemon(
    config: Config, root: Path, pngs: list[Source], rule: Rule, progress: Callable[[str], None]
) -> dict[str, Any]:
    payloads = [(f"{i:04d}-{s.path.name}", s.path.read_bytes()) for i, s in _cycle(pngs, config.burst)]
    square = [s for s in pngs if s.size == config.sizes[0]]
    paced = [(f"{i:04d}-{s.path.name}", s.path.read_bytes()) for i, s in _cycle(square, config.latency)]
    out: dict[str, Any] = {"latency_source": square[0].group, "bursts": [], "bare": []}
    for round_ in range(1, config.rounds + 1):
        for workers in (1, 2):
            progress(f"daemon: burst of {config.burst} with {workers} worker(s), round {round_} of {config.rounds}")
            result = daemon.burst(
                root,
                name=f"burst-{workers}w-r{round_}",
                workers=workers,
                payloads=payloads,
                latency=paced if (workers, round_) == (2, 1) else (),
                rate=config.rate,
                idle_seconds=config.idle_seconds,
            )
            out["bursts"].append({"round": round_, **result})
        for workers in (1, 2):
            progress(f"workers without the daemon: burst of {config.burst} in {workers}, round {round_}")
            found = bare.burst(root, name=f"bare-{workers}w-r{round_}", workers=workers, payloads=payloads, rule=rule)
            out["bare"].append({"round": round_, **found})
    progress(f"daemon: backlog of {config.backlog}")
    out["backlog"] = daemon.backlog(
        root, sources=[s.path for s in pngs], count=config.backlog, start_at=config.backlog_from
    )
    return out


def _cycle(sources: list[Source], count: int) -> list[tuple[int, Source]]:
    return [(i, sources[i % len(sources)]) for i in range(count)]
