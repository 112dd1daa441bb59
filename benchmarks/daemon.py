"""The real daemon: `sinkwatch run` in a subprocess on temp folders, as a user starts it.

- burst: files written into the watch folder as fast as possible; throughput
  is their count over the time from the first write to the last frame
  published (the frames' mtimes);
- latency: files written at a steady rate; each frame's publication (its
  rename into the queue) is seen through inotify, and the latency is that
  moment minus the moment the benchmark closed the source file;
- backlog: a folder full of images before the daemon starts; RSS and open
  file descriptors of the daemon and its workers are sampled from /proc
  while it works through them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from benchmarks import procs
from benchmarks.machine import percentile

REPO = Path(__file__).resolve().parents[1]
POLL = 0.05
# Whose memory and files the backlog judges: the daemon's own process, its workers together.
ROLES = ("daemon", "worker")


class DaemonRun:
    """One `python -m service run` with its own watch and queue folders under `root`."""

    def __init__(self, root: Path, name: str, *, workers: int) -> None:
        self.watch = root / f"{name}-watch"
        self.queue = root / f"{name}-queue"
        self.log = root / f"{name}.log"
        self.workers = workers
        self.watch.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, *, timeout: float = 120) -> None:
        args = [
            sys.executable, "-m", "service", "run",
            "--watch", str(self.watch), "--queue", str(self.queue), "--workers", str(self.workers),
            "--metrics-port", str(self.port), "--log-format", "json",
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log, env=env, cwd=self.watch.parent)
        _until(self._ready, timeout, "the daemon to become ready")

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def counts(self) -> tuple[int, int]:
        """Frames published and reject records written so far."""
        rejected = self.queue / "rejected"
        return _count(self.queue, ".png"), _count(rejected, ".json") if rejected.is_dir() else 0

    def wait_done(self, total: int, *, timeout: float) -> None:
        """Until `total` sources are published; a reject or the deadline is an error."""

        def done() -> bool:
            published, rejected = self.counts()
            if rejected:
                raise RuntimeError(f"the daemon rejected {rejected} images; see {self.log}")
            return published >= total

        _until(done, timeout, f"{total} frames to be published")

    def histogram(self, name: str) -> tuple[float, float]:
        """(sum, count) of a histogram of /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as response:
            text = response.read().decode()
        values = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
        return float(values.get(f"{name}_sum", 0.0)), float(values.get(f"{name}_count", 0.0))


@contextmanager
def running(root: Path, name: str, *, workers: int) -> Iterator[DaemonRun]:
    daemon = DaemonRun(root, name, workers=workers)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()


def write_file(path: Path, data: bytes) -> float:
    """Write `data` to its final name in one open/write/close, like ComfyUI; the time of the close."""
    with path.open("wb") as handle:
        handle.write(data)
    return time.time()


def burst(
    root: Path,
    *,
    name: str,
    workers: int,
    payloads: Sequence[tuple[str, bytes]],
    latency: Sequence[tuple[str, bytes]] = (),
    rate: float = 5.0,
    idle_seconds: float = 1.0,
) -> dict[str, Any]:
    """Throughput of a burst; with `latency` files, then latency at `rate` images/s (same daemon).

    `name` names the daemon's folders under `root`: one per burst, so that no burst sees another's files.
    """
    with running(root, name, workers=workers) as daemon:
        # Spawned workers import numpy and OpenCV on their first image: not part of the burst.
        warm = payloads[: 2 * workers]
        for name, data in warm:
            write_file(daemon.watch / f"warmup-{name}", data)
        daemon.wait_done(len(warm), timeout=120)
        cpu_before = procs.cpu_seconds(daemon.pid)
        time.sleep(idle_seconds)
        idle_cpu = (procs.cpu_seconds(daemon.pid) - cpu_before) / idle_seconds

        cpu_main, cpu_all = procs.cpu_seconds(daemon.pid), procs.family_cpu(daemon.pid)
        busy = procs.machine_busy_seconds()
        started = time.time()
        for name, data in payloads:
            write_file(daemon.watch / f"burst-{name}", data)
        daemon.wait_done(len(warm) + len(payloads), timeout=60 + 5 * len(payloads))
        finished = max((daemon.queue / f"burst-{Path(name).stem}.png").stat().st_mtime for name, _ in payloads)
        wall = finished - started
        used = procs.family_cpu(daemon.pid) - cpu_all
        result: dict[str, Any] = {
            "workers": workers,
            "images": len(payloads),
            "seconds": round(wall, 3),
            "images_per_second": len(payloads) / wall,
            # CPU the daemon and its workers got, in cores: on a shared machine, what the burst could use.
            "cores_used": round(used / wall, 2),
            # Throughput per CPU second: flat from 1 to 2 workers means scaling is bounded by free cores only.
            "images_per_cpu_second": round(len(payloads) / used, 2),
            "machine_busy_cores": round((procs.machine_busy_seconds() - busy) / wall, 2),
            "daemon_main_cores": round((procs.cpu_seconds(daemon.pid) - cpu_main) / wall, 2),
            "idle_daemon_cpu_percent": round(100 * idle_cpu, 1),
        }
        if latency:
            result["latency"] = _latency(daemon, latency, rate=rate, already=len(warm) + len(payloads))
    return result


def _latency(daemon: DaemonRun, payloads: Sequence[tuple[str, bytes]], *, rate: float, already: int) -> dict[str, Any]:
    seen: dict[str, float] = {}
    handler = _PublishClock(daemon.queue, seen)
    observer = Observer()
    observer.schedule(handler, str(daemon.queue), recursive=False)
    observer.start()
    try:
        hist_before = daemon.histogram("sinkwatch_publish_latency_seconds")
        closed: dict[str, float] = {}
        start = time.monotonic()
        for i, (name, data) in enumerate(payloads):
            time.sleep(max(0.0, start + i / rate - time.monotonic()))  # pacing, not waiting
            closed[f"latency-{Path(name).stem}.png"] = write_file(daemon.watch / f"latency-{name}", data)
        daemon.wait_done(already + len(payloads), timeout=60 + 5 * len(payloads))
        _until(lambda: all(name in seen for name in closed), 10, "inotify to report every frame")
        hist_after = daemon.histogram("sinkwatch_publish_latency_seconds")
    finally:
        observer.stop()
        observer.join()
    latencies = sorted(seen[name] - closed[name] for name in closed)
    count = hist_after[1] - hist_before[1]
    # The workers' own time per image (sidecar timings: decode to encode), under the same load as the latency.
    worked = [_sidecar_ms(daemon.queue, Path(name).stem) for name in closed]
    return {
        "images": len(payloads),
        "rate_per_second": rate,
        "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": round(1000 * percentile(latencies, 99), 1),
        "max_ms": round(1000 * latencies[-1], 1),
        # The daemon's own view (from the event it took to the publication), for comparison.
        "daemon_mean_ms": round(1000 * (hist_after[0] - hist_before[0]) / count, 1) if count else None,
        "worker_p50_ms": percentile(worked, 50),
    }


def _sidecar_ms(queue: Path, stem: str) -> float:
    sidecar = json.loads((queue / "matrix" / f"{stem}.json").read_text(encoding="utf-8"))
    return float(sum(sidecar["timings_ms"].values()))


class _PublishClock(FileSystemEventHandler):
    """Records when each frame appears at the top of the queue (renamed in, or created)."""

    def __init__(self, queue: Path, seen: dict[str, float]) -> None:
        self.queue = str(queue)
        self.seen = seen

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in ("created", "moved"):
            return
        path = os.fsdecode(getattr(event, "dest_path", "") or event.src_path)
        if os.path.dirname(path) == self.queue and path.endswith(".png"):
            self.seen.setdefault(os.path.basename(path), time.time())


def backlog(
    root: Path, *, sources: Sequence[Path], count: int, start_at: int, workers: int = 2, interval: float = 0.25
) -> dict[str, Any]:
    """RSS and open files of daemon + workers while it works through `count` files present at start."""
    daemon = DaemonRun(root, "backlog", workers=workers)
    for i in range(count):
        source = sources[i % len(sources)]
        # Hard links: thousands of sources at no disk cost; each is its own file to the daemon.
        os.link(source, daemon.watch / f"backlog-{i:05d}-{source.name}")
    samples: list[dict[str, Any]] = []
    started = time.time()
    try:
        daemon.start()
        deadline = time.monotonic() + 120 + 2 * count
        while True:
            published, rejected = daemon.counts()
            members = procs.sample(daemon.pid)
            samples.append(
                {
                    "t": round(time.time() - started, 2),
                    "published": published,
                    "rss_kb": sum(m.rss_kb for m in members),
                    "fds": sum(m.fds for m in members),
                    "processes": [[m.role, m.rss_kb, m.fds] for m in members],
                }
            )
            if rejected:
                raise RuntimeError(f"the daemon rejected {rejected} images; see {daemon.log}")
            if published >= count:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"backlog: only {published} of {count} published before the deadline")
            time.sleep(interval)
    finally:
        daemon.stop()
    return _growth(samples, count=count, start_at=start_at) | {
        "images_per_second": round(count / samples[-1]["t"], 2),
        "samples": samples,
    }


def _growth(samples: list[dict[str, Any]], *, count: int, start_at: int) -> dict[str, Any]:
    """RSS and fds at image `start_at` against image `count`: the peak of each over the tenth of the run that
    starts there and the tenth that ends there, for the daemon's own process and for its workers together.

    Peaks, not single samples: a worker's RSS swings by tens of MB within one image. Short windows at both
    ends, so that a steady leak shows in full (the peak of a long window sits at its end); each role on its
    own, so that the daemon's growth is not lost in the workers' larger, flat RSS.
    """
    window = max(1, (count - start_at) // 10)
    after = [s for s in samples if s["published"] >= start_at]
    # A short backlog may pass the first window between two samples: then the first sample after it.
    early = [s for s in after if s["published"] < start_at + window] or after[:1]
    late = [s for s in samples if s["published"] >= count - window]
    out: dict[str, Any] = {"images": count, "from_image": start_at, "window": window}
    for key in ("rss_kb", "fds"):
        out[key] = {}
        for role in ROLES:
            first = max((_of_role(s, role, key) for s in early), default=None)
            last = max((_of_role(s, role, key) for s in late), default=None)
            out[key][role] = {
                "peak": max(_of_role(s, role, key) for s in samples),
                "early_peak": first,
                "late_peak": last,
                "growth": last / first - 1 if first and last else None,
            }
    return out


def _of_role(sample: dict[str, Any], role: str, key: str) -> int:
    """RSS or fds of the processes of one role in one sample."""
    column = 1 if key == "rss_kb" else 2
    return sum(member[column] for member in sample["processes"] if member[0] == role)


def _count(folder: Path, suffix: str) -> int:
    try:
        with os.scandir(folder) as entries:
            return sum(1 for e in entries if e.name.endswith(suffix) and e.is_file(follow_symlinks=False))
    except FileNotFoundError:
        return 0


def _until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(POLL)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
