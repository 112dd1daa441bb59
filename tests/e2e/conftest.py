"""The real daemon in a subprocess on real temp folders, for end-to-end tests."""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import prometheus_client
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.daemon import Daemon
from service.settings import Settings
from tests.conftest import PHOTO_NAMES, load_photo, wait_for

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class DaemonProcess:
    """`sinkwatch run` as a user starts it, with JSON logs captured to a file."""

    def __init__(
        self, watch: Path, queue: Path, log: Path, *args: str, env: dict[str, str] | None = None, main: str = "service"
    ) -> None:
        """`main` is the module run as the program: a test's own wrapper of `service.cli.main`, say."""
        self.watch, self.queue, self.log = watch, queue, log
        self.port = free_port()
        self.args = [
            sys.executable, "-m", main, "run",
            "--watch", str(watch), "--queue", str(queue),
            "--metrics-port", str(self.port), "--log-format", "json", "--log-level", "DEBUG",
            "--workers", "2", "--settle-seconds", "0.3",
            *args,
        ]  # fmt: skip
        self.env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, wait_ready: bool = True) -> DaemonProcess:
        handle = self.log.open("ab")
        self.proc = subprocess.Popen(self.args, stdout=handle, stderr=handle, env=self.env, cwd=self.watch.parent)
        handle.close()
        if wait_ready:
            wait_for(self.ready, timeout=60)
        return self

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"daemon exited early with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(self.url + "/readyz", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, *, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)

    def records(self) -> list[dict[str, object]]:
        """The JSON log records written so far."""
        out = []
        for line in self.log.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                out.append(json.loads(line)["record"])
            except (ValueError, KeyError):
                continue
        return out

    def messages(self) -> list[str]:
        return [str(r["message"]) for r in self.records()]


def frames(queue: Path) -> list[Path]:
    """Top-level files of the queue: exactly what ComfyUI's LoadImage lists."""
    return sorted(p for p in queue.iterdir() if p.is_file())


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Content hash and mtime of every file below `folder`."""
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    watch = tmp_path / "watch"
    queue = tmp_path / "queue"
    watch.mkdir()
    return watch, queue


@pytest.fixture
def daemon(folders: tuple[Path, Path], tmp_path: Path) -> Iterator[DaemonProcess]:
    """A daemon on `folders`, not started; stopped (SIGTERM) after the test, which must exit 0."""
    watch, queue = folders
    proc = DaemonProcess(watch, queue, tmp_path / "daemon.log")
    yield proc
    if proc.proc is not None and proc.proc.poll() is None:
        code = proc.stop()
        assert code == 0, proc.log.read_text()[-4000:]


def wait_published(queue: Path, count: int, *, timeout: float = 90) -> list[Path]:
    def enough() -> list[Path] | None:
        found = frames(queue) if queue.exists() else []
        return found if len(found) >= count else None

    result = wait_for(enough, timeout=timeout)
    assert isinstance(result, list)
    return result


# -- additions for the daemon end-to-end tests ---------------------------------------------

RULES_DIR = "rules"


def png_bytes(rgb: np.ndarray) -> bytes:
    """An RGB array as PNG bytes, saved the way ComfyUI's SaveImage does (Pillow, compress level 4)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="PNG", compress_level=4)
    return buffer.getvalue()


def write_photo(path: Path, rgb: np.ndarray) -> Path:
    """Write a PNG straight to its final name in one open/write/close, like ComfyUI."""
    path.write_bytes(png_bytes(rgb))
    return path


# The scikit-image photographs: loading them is quick (scikit-learn's would import all of it).
SMALL_SOURCES = tuple(name for name in PHOTO_NAMES if name not in ("china", "flower"))


@functools.cache
def _photo(name: str) -> np.ndarray:
    return load_photo(name)


def small_photo(index: int, *, height: int = 64, width: int = 96) -> np.ndarray:
    """A small crop of a real photograph; every index gives different content (for bursts)."""
    rgb = _photo(SMALL_SOURCES[index % len(SMALL_SOURCES)])
    offset = (index // len(SMALL_SOURCES)) * 3 % 232  # distinct for the first 385 indices
    crop = rgb[offset : offset + height, offset : offset + width]
    assert crop.shape == (height, width, 3), f"photo too small for crop {index}"
    return np.ascontiguousarray(crop)


def copy_rules(folder: Path, **default: int) -> Path:
    """The shipped presets (installed `rules` package) copied into `folder`, with the default
    rule's [resize] width/height replaced, e.g. a small frame where the size does not matter."""
    folder.mkdir(parents=True, exist_ok=True)
    for entry in importlib.resources.files(RULES_DIR).iterdir():
        if entry.name.endswith(".toml"):
            (folder / entry.name).write_text(entry.read_text(encoding="utf-8"), encoding="utf-8")
    path = folder / "default.toml"
    text = path.read_text(encoding="utf-8")
    for key, value in default.items():
        text, count = re.subn(rf"(?m)^{key} = \d+$", f"{key} = {value}", text, count=1)
        assert count == 1, f"default.toml has no '{key} = N' line"
    path.write_text(text, encoding="utf-8")
    return folder


def run_sinkwatch(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """One `sinkwatch ...` command as a user types it; stdout and stderr captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def reference_frames(sources: list[Path], work: Path, *flags: str) -> dict[str, bytes]:
    """Frame name -> bytes of what a fresh `sinkwatch process` makes of `sources` (a queue of its own)."""
    queue = work / f"reference-{len(list(work.glob('reference-*')))}"
    done = run_sinkwatch("process", *map(str, sources), "--queue", str(queue), "--workers", "1", *flags, cwd=work)
    assert done.returncode == 0, done.stderr[-4000:]
    return {frame.name: frame.read_bytes() for frame in frames(queue)}


def logged(records: list[dict[str, Any]], verb: str) -> list[str]:
    """The source keys of the "published" / "rejected" log records, in log order."""
    return [str(r["extra"]["source"]) for r in records if str(r["message"]).startswith(f"{verb} ")]


def sidecars(queue: Path) -> dict[str, dict[str, Any]]:
    """Every sidecar of the queue by output name (stem)."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted((queue / "matrix").glob("*.json")):
        out[path.stem] = json.loads(path.read_text(encoding="utf-8"))
    return out


def check_outputs_complete(queue: Path, *, foreign: tuple[str, ...] = ()) -> None:
    """What ComfyUI (top level) and a user (matrix/, rejected/) can see is whole: no temp or hidden
    files, every PNG decodes completely with Pillow, every JSON parses, every frame has its set
    (but the `foreign` files: the user's own images in the queue)."""
    problems: list[str] = []
    top = frames(queue)
    for path in top:
        if path.name.startswith(".") or path.suffix != ".png":
            problems.append(f"not a frame at the top level: {path.name}")
    for folder, allowed in (("matrix", (".matrix.png", ".json")), ("rejected", (".json",))):
        for path in sorted((queue / folder).glob("*")) if (queue / folder).is_dir() else []:
            if path.name.startswith(".") or not path.name.endswith(allowed):
                problems.append(f"unexpected file in {folder}/: {path.name}")
    for path in [*top, *(queue / "matrix").glob("*.png")] if (queue / "matrix").is_dir() else top:
        try:
            with Image.open(path) as image:
                image.load()
        except Exception as exc:  # any decode failure is the finding
            problems.append(f"{path.relative_to(queue)} does not decode: {exc!r}")
    for path in [*(queue / "matrix").glob("*.json"), *(queue / "rejected").glob("*.json")]:
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            problems.append(f"{path.relative_to(queue)} is not JSON: {exc}")
    for path in top:
        if path.name in foreign:
            continue
        for part in (queue / "matrix" / f"{path.stem}.matrix.png", queue / "matrix" / f"{path.stem}.json"):
            if not part.is_file():
                problems.append(f"frame {path.name} is published without {part.relative_to(queue)}")
    assert not problems, "\n".join(problems)


def metric_values(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The samples of a /metrics body: (name, labels) -> value."""
    return {
        (sample.name, frozenset(sample.labels.items())): float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (e.g. over all rules)."""
    values = metric_values(text)
    found = [v for (n, lab), v in values.items() if n == name and set(labels.items()) <= lab]
    assert found, f"{name}{labels} not exported"
    return sum(found)


SENTINEL = "zz_sentinel.png"


def sentinel(watch: Path, queue: Path, *, daemon: DaemonProcess | None = None, name: str = SENTINEL) -> Path:
    """Drop one more image and wait until it is published (and, given the `daemon`, logged).
    Processing is FIFO, so once it is out, everything the daemon was going to do about the
    files before it has been done and recorded."""
    write_photo(watch / name, small_photo(4))
    frame = queue / f"{Path(name).stem}.png"
    wait_for(frame.is_file, timeout=90)
    if daemon is not None:
        wait_for(lambda: name in logged(daemon.records(), "published"), timeout=30)
    return frame


def check_watch_unchanged(watch: Path, before: dict[str, tuple[str, int]], *, added: tuple[str, ...] = ()) -> None:
    """The watch folder holds exactly what the test wrote: same bytes, same mtimes, nothing new
    (apart from files the test `added` after taking `before`)."""
    after = snapshot(watch)
    extra = {name: after.pop(name, None) for name in added}
    assert all(extra.values()), f"the test's own files vanished: {extra}"
    assert after == before, "the daemon changed the watch folder"


class InProcessDaemon:
    """`service.daemon.Daemon` run like `Daemon.run()` does, but on a thread of the test:
    initialize, loop until stopped, shutdown (all on that thread: the ledger's SQLite
    connection belongs to it). Signals stay with pytest; `close()` is the SIGTERM."""

    def __init__(self, settings: Settings, *, wait_ready: bool = True) -> None:
        self.wait_ready = wait_ready
        self.created_series = getattr(prometheus_client.metrics, "_use_created", True)
        self.daemon = Daemon(settings)
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, name="sinkwatch-in-process")

    def _run(self) -> None:
        daemon = self.daemon
        try:
            try:
                daemon.initialize()
            except BaseException:
                daemon.resources.close()
                raise
            try:
                daemon.loop()
            finally:
                daemon.shutdown()
        except BaseException as exc:  # handed to the test thread
            self.errors.append(exc)

    def __enter__(self) -> InProcessDaemon:
        self.thread.start()
        if not self.wait_ready:
            return self
        wait_for(lambda: self.errors or self.daemon.ready or not self.thread.is_alive(), timeout=60)
        if self.errors:
            self.thread.join()
            raise self.errors[0]
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.daemon.stop()
        self.thread.join(timeout=60)
        # The daemon switches prometheus_client's *_created series off for the whole process.
        if self.created_series:
            prometheus_client.enable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated upstream
        assert not self.thread.is_alive(), "the in-process daemon did not stop within 60 s"
        if self.errors:
            raise self.errors[0]

    def sample(self, name: str, **labels: str) -> float | None:
        return self.daemon.registry.get_sample_value(name, labels)


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
