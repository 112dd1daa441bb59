"""Shared tools of the fault, fuzz and soak suite (issue 8).

The suite abuses the real daemon (`tests.e2e.conftest.DaemonProcess`) and the
in-process runner. Everything here is small: distinct images cut from the real
photographs, a rule folder copied from the shipped presets, tmpfs mounts,
readings of /proc and /metrics, the reference outputs of a fresh run, and the
counts each test records (printed, written under its tmp_path, and repeated in
a "sinkwatch fault suite" section at the end of the pytest output).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import random
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.publish import TEMP_DIR
from service.rules import Rule
from service.runner import Job, Outcome, process_job
from tests.conftest import PHOTO_NAMES, wait_for
from tests.e2e.conftest import DaemonProcess, frames

MAX_BYTES = 256 * 1024 * 1024  # the daemon's defaults, for in-process jobs
MAX_PIXELS = 100_000_000
_COUNTS = pytest.StashKey[list[str]]()


# -- images -------------------------------------------------------------------------------------


class Images:
    """Distinct small images cut from the real photographs; image `i` is always the same bytes.

    Photo ``i % 7`` is downscaled (area filter) so that its short side is twice
    `side`, a seeded crop of ``side x side`` is taken, and `i` is written into
    the first four pixels so that no two indices share content.
    """

    def __init__(self, photos: dict[str, np.ndarray]) -> None:
        self.photos = photos
        self._scaled: dict[tuple[str, int], np.ndarray] = {}

    def rgb(self, i: int, *, side: int = 128) -> np.ndarray:
        name = PHOTO_NAMES[i % len(PHOTO_NAMES)]
        base = self._base(name, 2 * side)
        rng = random.Random(f"{i}-{side}")
        y = rng.randrange(base.shape[0] - side + 1)
        x = rng.randrange(base.shape[1] - side + 1)
        crop = base[y : y + side, x : x + side].copy()
        crop[0, :4, 0] = np.frombuffer(i.to_bytes(4, "big"), np.uint8)
        return crop

    def make(self, i: int, *, fmt: str = "PNG", side: int = 128) -> bytes:
        return encode(self.rgb(i, side=side), fmt)

    def _base(self, name: str, short: int) -> np.ndarray:
        key = (name, short)
        if key not in self._scaled:
            photo = self.photos[name]
            scale = short / min(photo.shape[:2])
            size = (max(short, round(photo.shape[1] * scale)), max(short, round(photo.shape[0] * scale)))
            self._scaled[key] = np.asarray(Image.fromarray(photo).resize(size, Image.Resampling.BOX))
        return self._scaled[key]


def encode(rgb: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    options: dict[str, Any] = {"PNG": {"compress_level": 1}, "JPEG": {"quality": 90}, "WEBP": {"quality": 80}}[fmt]
    Image.fromarray(rgb).save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def images(photos: dict[str, np.ndarray]) -> Images:
    return Images(photos)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_atomically(path: Path, data: bytes) -> None:
    """How a careful generator writes: a hidden temp name, then a rename (a `moved` event)."""
    temp = path.with_name(f".{path.name}.partial")
    temp.write_bytes(data)
    os.replace(temp, path)


def write_in_chunks(path: Path, data: bytes, *, chunks: int = 3) -> None:
    """How ComfyUI writes: open, several writes, close (`created`, `modified`, `closed`)."""
    step = -(-len(data) // chunks)
    with path.open("wb") as handle:
        for start in range(0, len(data), step):
            handle.write(data[start : start + step])
            handle.flush()


class Writer(threading.Thread):
    """Drops files into a folder over time, like a generator at work; `finish()` joins it."""

    def __init__(
        self,
        folder: Path,
        files: list[tuple[str, bytes]],
        *,
        seed: int,
        pause: tuple[float, float] = (0.05, 0.5),
        ways: tuple[str, ...] = ("chunks", "rename"),
    ) -> None:
        super().__init__(name="fault-writer", daemon=True)
        self.folder, self.files, self.pause, self.ways = folder, files, pause, ways
        self.rng = random.Random(seed)
        self.written: list[str] = []
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            for name, data in self.files:
                if self._halt.wait(self.rng.uniform(*self.pause)):
                    return
                way = self.rng.choice(self.ways)
                (write_in_chunks if way == "chunks" else write_atomically)(self.folder / name, data)
                self.written.append(name)
        except BaseException as exc:  # reported by finish(), in the test's thread
            self.error = exc

    def finish(self, *, timeout: float = 120, halt: bool = False) -> list[str]:
        if halt:
            self._halt.set()
        self.join(timeout)
        assert not self.is_alive(), "the writer did not finish in time"
        if self.error is not None:
            raise self.error
        return self.written


# -- rules --------------------------------------------------------------------------------------


def copy_presets(folder: Path, *, size: tuple[int, int] | None = None) -> Path:
    """The shipped presets copied into `folder`; `size` shrinks the default rule's output (speed)."""
    folder.mkdir(parents=True, exist_ok=True)
    for entry in resources.files("rules").iterdir():
        if entry.name.endswith(".toml"):
            (folder / entry.name).write_text(entry.read_text(encoding="utf-8"), encoding="utf-8")
    if size is not None:
        path = folder / "default.toml"
        text = path.read_text(encoding="utf-8")
        assert "width = 832\n" in text and "height = 480\n" in text, "the default preset changed its size lines"
        text = text.replace("width = 832\n", f"width = {size[0]}\n").replace("height = 480\n", f"height = {size[1]}\n")
        path.write_text(text, encoding="utf-8")
    return folder


# -- the daemon's outputs -----------------------------------------------------------------------


def sidecars(queue: Path) -> dict[str, dict[str, Any]]:
    """Every sidecar of the queue by the source key it names."""
    found: dict[str, dict[str, Any]] = {}
    matrix = queue / "matrix"
    for path in sorted(matrix.glob("*.json")) if matrix.is_dir() else []:
        sidecar = json.loads(path.read_text(encoding="utf-8"))
        key = sidecar["source"]["key"]
        assert key not in found, f"two sidecars name the source {key!r}: {path.name}"
        found[key] = sidecar
    return found


def rejects(queue: Path) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    folder = queue / "rejected"
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        record = json.loads(path.read_text(encoding="utf-8"))
        found[record["key"]] = record
    return found


def decodes_completely(path: Path) -> bool:
    """A PNG that Pillow (ComfyUI's reader) loads to the last row, with a valid IEND."""
    try:
        with Image.open(path) as im:
            im.load()
        with Image.open(path) as im:
            im.verify()
    except Exception:
        return False
    return True


def check_published_set(
    queue: Path, *, checked: dict[str, tuple[int, int, int]] | None = None
) -> dict[str, dict[str, Any]]:
    """What ComfyUI could see right now is consistent: only frames at the top, each with its set.

    Returns the sidecars by source key. Fails on any visible file that is not a
    finished frame, a frame without heatmap or sidecar, a frame whose bytes are
    not the ones its sidecar names, or one that does not decode completely.
    `checked` (name -> inode, size, mtime) spares decoding a frame again that
    has not changed since an earlier call.
    """
    by_key = sidecars(queue)
    by_frame = {sidecar["output"]["frame"]: sidecar for sidecar in by_key.values()}
    for path in frames(queue) if queue.exists() else []:
        assert path.suffix == ".png" and not path.name.startswith("."), f"not a frame at the top: {path.name!r}"
        sidecar = by_frame.get(path.name)
        assert sidecar is not None, f"frame {path.name!r} has no sidecar (published before it)"
        assert (queue / sidecar["output"]["heatmap"]).is_file(), f"frame {path.name!r} has no heatmap"
        assert sha256(path.read_bytes()) == sidecar["output"]["frame_sha256"], f"frame {path.name!r} is not its own"
        st = path.stat()
        identity = (st.st_ino, st.st_size, st.st_mtime_ns)
        if checked is None or checked.get(path.name) != identity:
            assert decodes_completely(path), f"frame {path.name!r} does not decode completely"
            if checked is not None:
                checked[path.name] = identity
    return by_key


def temp_files(queue: Path) -> list[str]:
    folder = queue / TEMP_DIR
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def reference_run(source: Path, *, key: str, name: str, rule: Rule, queue: Path) -> Outcome:
    """A fresh in-process run of the single runner for one source, into another queue."""
    job = Job(source=source, key=key, name=name, rule=rule, queue=queue, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)
    return process_job(job)


def without_timings(sidecar: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in sidecar.items() if key != "timings_ms"}


def assert_same_outputs(queue: Path, reference: Path, name: str) -> None:
    """Frame and heatmap bytes and the sidecar (less its timings) equal the reference run's."""
    for relative in (f"{name}.png", f"matrix/{name}.matrix.png"):
        assert (queue / relative).read_bytes() == (reference / relative).read_bytes(), f"{relative} differs"
    ours = json.loads((queue / "matrix" / f"{name}.json").read_text(encoding="utf-8"))
    theirs = json.loads((reference / "matrix" / f"{name}.json").read_text(encoding="utf-8"))
    assert without_timings(ours) == without_timings(theirs), f"sidecar of {name!r} differs from a fresh run"


# -- the daemon process -------------------------------------------------------------------------


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    """Daemons a test started (append them); any still running at the end is stopped, then killed."""
    started: list[DaemonProcess] = []
    yield started
    for daemon in started:
        if daemon.proc is not None and daemon.proc.poll() is None:
            try:
                daemon.stop(timeout=60)
            except subprocess.TimeoutExpired:
                daemon.kill()


def metric(daemon: DaemonProcess, name: str, **labels: str) -> float:
    """One sample of the daemon's /metrics (0.0 when the series does not exist)."""
    status, text = daemon.get("/metrics")
    assert status == 200, f"/metrics answered {status}"
    return metric_in(text, name, **labels)


def metric_in(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def poll(predicate: Callable[[], object], *, timeout: float) -> bool:
    """Like wait_for, but running out of time is an answer (False), not a failure."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def health(daemon: DaemonProcess) -> int:
    try:
        return daemon.get("/healthz")[0]
    except OSError:
        return 0


def log_records(log: Path) -> list[dict[str, Any]]:
    """The JSON log records of one daemon log (a line cut by kill -9 is skipped)."""
    out = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            out.append(json.loads(line)["record"])
    return out


def published_records(log: Path) -> list[dict[str, Any]]:
    """The "published ..." log records (one per publication), oldest first."""
    return [r for r in log_records(log) if str(r["message"]).startswith("published ")]


# -- /proc --------------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """RSS (kB), open fds and threads of a live process."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {
        "rss_kb": int(fields["VmRSS"].split()[0]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": len(os.listdir(f"/proc/{pid}/task")),
    }


def children(pid: int) -> list[int]:
    """Direct children of `pid` (the worker processes of a daemon)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- tmpfs --------------------------------------------------------------------------------------


class Tmpfs:
    """A tmpfs mounted for one test (root only); `remount` toggles read-only."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def mount(self, size: str) -> Tmpfs:
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(self.path)], check=True)
        return self

    def remount(self, *, read_only: bool, timeout: float = 30) -> None:
        """Remount; a file open for writing makes the kernel answer EBUSY for a moment, so retry."""
        option = "remount,ro" if read_only else "remount,rw"

        def done() -> bool:
            result = subprocess.run(["mount", "-o", option, str(self.path)], capture_output=True)
            return result.returncode == 0

        wait_for(done, timeout=timeout, interval=0.02)

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def unmount(self) -> None:
        if os.path.ismount(self.path):
            result = subprocess.run(["umount", str(self.path)], capture_output=True)
            if result.returncode != 0:
                subprocess.run(["umount", "-l", str(self.path)], check=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str, str], Tmpfs]]:
    """Mount tmpfs file systems under tmp_path: ``tmpfs("qfs", "4m")``; unmounted at teardown."""
    mounted: list[Tmpfs] = []

    def mount(name: str, size: str) -> Tmpfs:
        fs = Tmpfs(tmp_path / name)
        try:
            fs.mount(size)
        except (subprocess.CalledProcessError, OSError) as exc:
            pytest.fail(f"cannot mount a tmpfs here ({exc}); this suite needs root for its disk faults")
        mounted.append(fs)
        return fs

    yield mount
    for fs in reversed(mounted):
        fs.unmount()


def fill(folder: Path, *, leave: int = 0) -> Path:
    """Fill the file system of `folder` with one filler file until about `leave` bytes stay free."""
    slack = folder / "filler-slack"
    if leave:
        slack.write_bytes(b"\0" * leave)
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as handle:
        for block in (b"\0" * (1 << 16), b"\0" * 512):
            try:
                while handle.write(block):
                    pass
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    if leave:
        slack.unlink()
    return filler


# -- counts -------------------------------------------------------------------------------------


@pytest.fixture
def counts(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., None]:
    """Record a test's counts: printed, written to tmp_path/counts.json, summarised at the end."""
    started = time.monotonic()

    def record(**values: object) -> None:
        values = {**values, "seconds": round(time.monotonic() - started, 1)}
        line = f"{request.node.nodeid}: " + ", ".join(f"{k}={v}" for k, v in values.items())
        request.config.stash.setdefault(_COUNTS, []).append(line)
        print(line)
        (tmp_path / "counts.json").write_text(json.dumps(values, default=str, indent=2), encoding="utf-8")

    return record


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    lines = config.stash.get(_COUNTS, [])
    if lines:
        terminalreporter.section("sinkwatch fault suite: counts")
        for line in lines:
            terminalreporter.write_line(line)
