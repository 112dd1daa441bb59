"""The workers without the daemon: what two workers can do on this machine, beside what the daemon gets.

A burst's files are handed straight to `process_job` in a pool of spawned
processes set up as the daemon's workers are, with no watch, ledger, metrics
or log in the way. Its 2-over-1 ratio is the machine's ceiling for the
daemon's: the gap between the two is the daemon's own share of the cores.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks import procs
from benchmarks.single import RUNNER_LIMITS
from service import pool
from service.rules import Rule
from service.runner import Job, process_job


@contextmanager
def worker_pool(spool: Path, *, workers: int = 1) -> Iterator[ProcessPoolExecutor]:
    """Processes set up exactly as the daemon's workers are (spawned; one OpenCV thread; malloc tuning)."""
    spool.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=pool.init_worker,  # exactly what WorkerPool gives its executor
        initargs=(os.getpid(), str(spool)),
    ) as executor:
        yield executor


def burst(root: Path, *, name: str, workers: int, payloads: Sequence[tuple[str, bytes]], rule: Rule) -> dict[str, Any]:
    """Throughput of `payloads` through `process_job` in `workers` processes: their count over the time from
    the first job handed to the pool to the last result back. `name` names its folders under `root`."""
    sources = root / f"{name}-sources"
    sources.mkdir(parents=True)
    jobs = []
    for file_name, data in payloads:
        path = sources / file_name
        path.write_bytes(data)
        jobs.append(
            Job(
                source=path,
                key=file_name,
                name=path.stem,
                rule=rule,
                queue=root / f"{name}-queue",
                max_bytes=RUNNER_LIMITS["max_bytes"].default,
                max_pixels=RUNNER_LIMITS["max_pixels"].default,
            )
        )
    with worker_pool(root / f"{name}-spool", workers=workers) as executor:
        # Spawned workers import numpy and OpenCV on their first image: not part of the burst.
        _check(executor.map(process_job, [replace(job, name=f"warmup-{job.name}") for job in jobs[: 2 * workers]]))
        # This process's descendants: the pool's workers (and multiprocessing's resource tracker, nearly idle).
        cpu = procs.family_cpu(os.getpid(), itself=False)
        started = time.perf_counter()
        _check(executor.map(process_job, jobs))
        wall = time.perf_counter() - started
        used = procs.family_cpu(os.getpid(), itself=False) - cpu
    return {
        "workers": workers,
        "images": len(jobs),
        "seconds": round(wall, 3),
        "images_per_second": len(jobs) / wall,
        "cores_used": round(used / wall, 2),
    }


def _check(outcomes: Iterator[Any]) -> None:
    for outcome in outcomes:
        if outcome.status != "published":
            raise RuntimeError(f"{outcome.key} was not published: {outcome.status} {outcome.error}")
