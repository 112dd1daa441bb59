"""The real daemon beside ComfyUI: frames in input/ are never seen half written, and remote uploads
arrive, with their workflow queued, even when ComfyUI is down for a while (across a daemon restart)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from prometheus_client.parser import text_string_to_metric_families

from service.comfyui import ComfyClient
from tests import fake_comfyui
from tests.conftest import PHOTO_NAMES, wait_for
from tests.e2e.conftest import DaemonProcess, frames, free_port, run_sinkwatch, wait_published
from tests.fake_comfyui import FakeComfyUI
from tests.service.test_uploader import stored

SMOKE = Path(__file__).resolve().parents[2] / "deploy" / "comfyui" / "loadimage-save-api.json"
FRAME_NAME = re.compile(r"[^.].*\.png")  # what may appear at the top of the queue: finished frames only


def drop(watch: Path, index: int, photos: dict[str, np.ndarray]) -> Path:
    """Write a real photo the way ComfyUI's SaveImage does: straight to its final name, with a prompt chunk."""
    name = PHOTO_NAMES[index % len(PHOTO_NAMES)]
    rgb = photos[name][(index // len(PHOTO_NAMES)) * 4 :]  # a few rows off: each file its own content
    info = PngInfo()
    info.add_text("prompt", json.dumps({"3": {"class_type": "KSampler", "inputs": {"seed": index}}}))
    path = watch / f"ComfyUI_{index + 1:05}_.png"
    Image.fromarray(np.ascontiguousarray(rgb)).save(path, pnginfo=info, compress_level=4)
    return path


def sidecar(queue: Path, frame: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((queue / "matrix" / f"{frame.stem}.json").read_text(encoding="utf-8"))
    return data


def counter(daemon: DaemonProcess, name: str, outcome: str) -> float:
    status, text = daemon.get("/metrics")
    assert status == 200
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("outcome") == outcome:
                return float(sample.value)
    raise AssertionError(f"{name}{{outcome={outcome!r}}} not exported")


def gauge(daemon: DaemonProcess, name: str) -> float | None:
    """The value of an unlabelled sample, None when it is not exported."""
    status, text = daemon.get("/metrics")
    assert status == 200
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return float(sample.value)
    return None


def promtool_check(daemon: DaemonProcess) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found on PATH: install the 'prometheus' package (apt-get install prometheus)")
    _status, text = daemon.get("/metrics")
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60, check=False
    )
    assert checked.returncode == 0, f"promtool check metrics:\n{checked.stdout}{checked.stderr}"


@contextlib.contextmanager
def fake_comfyui_on(port: int) -> Iterator[FakeComfyUI]:
    """The fake on a port chosen in advance, so that a daemon can point at it before it runs."""

    class OnPort(fake_comfyui._Server):
        def __init__(self, _address: object, handler: Any) -> None:
            super().__init__(("127.0.0.1", port), handler)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fake_comfyui, "_Server", OnPort)
        fake = FakeComfyUI()
    with fake:
        yield fake
    assert fake.errors == [], "the fake server hit an internal error"


@pytest.fixture
def start_daemon(folders: tuple[Path, Path], tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Start `sinkwatch run` with extra flags; each one still running is stopped after the test and must exit 0."""
    watch, queue = folders
    started: list[DaemonProcess] = []

    def start(*args: str) -> DaemonProcess:
        daemon = DaemonProcess(watch, queue, tmp_path / "daemon.log", *args).start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.proc is not None and daemon.proc.poll() is None:
            assert daemon.stop() == 0, daemon.log.read_text()[-4000:]


def uploaded(comfy: FakeComfyUI, queue: Path, expected: list[Path]) -> bool:
    """Every frame is in ComfyUI's input/sinkwatch/ byte for byte, and its sidecar names the queued prompt."""
    for frame in expected:
        data = frame.read_bytes()
        copy = comfy.input_dir / "sinkwatch" / stored(frame.stem, data)
        if not copy.exists() or copy.read_bytes() != data:
            return False
        if not sidecar(queue, frame).get("comfyui", {}).get("prompt_id"):
            return False
    return True


def check_prompts_ran_on_their_frames(comfy: FakeComfyUI, queue: Path, expected: list[Path]) -> None:
    client = ComfyClient(comfy.url)
    for frame in expected:
        note = sidecar(queue, frame)["comfyui"]
        name = f"sinkwatch/{stored(frame.stem, frame.read_bytes())}"
        assert note["upload"] == name
        assert client.wait(note["prompt_id"], timeout=10, poll=0.02) == "success"
        entry = client.history(note["prompt_id"])
        assert entry is not None and entry["prompt"][2]["1"]["inputs"]["image"] == name


# -- input/ is never seen half written --------------------------------------------------


@pytest.mark.slow
def test_a_reader_polling_the_queue_during_a_burst_only_ever_decodes_complete_frames(
    start_daemon: Callable[..., DaemonProcess], folders: tuple[Path, Path], photos: dict[str, np.ndarray]
) -> None:
    watch, queue = folders
    start_daemon()
    stop = threading.Event()
    decoded: dict[str, tuple[int, int]] = {}
    bad: list[str] = []

    def read() -> None:
        # What ComfyUI's LoadImage does with its input/ folder: list the top level, open the images.
        # Each new name is opened the moment it shows up, when a partial file would be caught.
        while not stop.wait(0.001):
            with os.scandir(queue) as listing:
                names = [entry.name for entry in listing if entry.is_file(follow_symlinks=False)]
            for name in names:
                if name in decoded:
                    continue
                if not FRAME_NAME.fullmatch(name):
                    bad.append(f"not a frame: {name}")
                    continue
                try:
                    with Image.open(queue / name) as image:
                        image.verify()
                    with Image.open(queue / name) as image:
                        image.load()
                        size = image.size
                except Exception as exc:
                    bad.append(f"{name}: {exc!r}")
                    continue
                if size[0] % 16 or size[1] % 16:
                    bad.append(f"{name}: {size}")
                decoded[name] = size

    reader = threading.Thread(target=read, name="queue-reader")
    reader.start()
    try:
        for index in range(40):
            drop(watch, index, photos)
        published = wait_published(queue, 40, timeout=180)
        wait_for(lambda: all(frame.name in decoded for frame in published), timeout=90)
    finally:
        stop.set()
        reader.join()

    assert bad == []
    assert sorted(decoded) == [frame.name for frame in published]
    assert len(published) == 40


# -- remote ComfyUI ------------------------------------------------------------------------


def test_every_published_frame_is_uploaded_and_its_workflow_queued(
    start_daemon: Callable[..., DaemonProcess], folders: tuple[Path, Path], photos: dict[str, np.ndarray]
) -> None:
    watch, queue = folders
    with FakeComfyUI() as comfy:
        daemon = start_daemon("--comfyui-url", comfy.url, "--comfyui-workflow", str(SMOKE))
        for index in range(4):
            drop(watch, index, photos)
        published = wait_published(queue, 4)
        wait_for(lambda: uploaded(comfy, queue, published), timeout=60)
        check_prompts_ran_on_their_frames(comfy, queue, published)
        wait_for(lambda: counter(daemon, "sinkwatch_comfyui_prompts_total", "queued") == 4)
        assert counter(daemon, "sinkwatch_comfyui_uploads_total", "ok") == 4
        assert counter(daemon, "sinkwatch_comfyui_uploads_total", "retried") == 0
        assert daemon.stop() == 0
    assert sorted(frames(queue)) == published, "the local queue holds the frames as well"


def watching(start_daemon: Callable[..., DaemonProcess], comfy: FakeComfyUI, *flags: str) -> DaemonProcess:
    """The daemon queueing the smoke workflow on `comfy` and looking at its video jobs every 0.2 s."""
    return start_daemon(
        "--comfyui-url", comfy.url, "--comfyui-workflow", str(SMOKE), "--comfyui-check-every", "0.2", *flags
    )


def lost_named(daemon: DaemonProcess, *, ending: str = "") -> list[str]:
    """The frames whose video job the daemon's log says ComfyUI lost (in lines that end with `ending`)."""
    said = [m for m in daemon.messages() if "lost the video job for " in m and m.endswith(ending)]
    return sorted(m.split("lost the video job for ")[1].split(" ")[0] for m in said)


def test_video_jobs_are_followed_to_their_end_and_those_a_comfyui_restart_drops_are_reported_lost(
    start_daemon: Callable[..., DaemonProcess], folders: tuple[Path, Path], photos: dict[str, np.ndarray]
) -> None:
    watch, _queue = folders
    with FakeComfyUI(pending_polls=10**9) as comfy:  # a prompt runs when the test says so
        daemon = watching(start_daemon, comfy)
        for index in range(3):
            drop(watch, index, photos)
        wait_for(lambda: counter(daemon, "sinkwatch_comfyui_prompts_total", "queued") == 3, timeout=90)
        comfy.run_queued()
        wait_for(lambda: counter(daemon, "sinkwatch_comfyui_jobs_total", "success") == 3)

        lost = sorted(drop(watch, index, photos).stem for index in range(3, 5))
        wait_for(lambda: counter(daemon, "sinkwatch_comfyui_prompts_total", "queued") == 5, timeout=90)
        comfy.restart()  # say the video of the first ran the GPU out of memory and took ComfyUI down
        wait_for(lambda: counter(daemon, "sinkwatch_comfyui_jobs_total", "lost") == 2)

        assert lost_named(daemon, ending="nothing queues it again by itself") == lost
        assert counter(daemon, "sinkwatch_comfyui_jobs_total", "success") == 3
        assert counter(daemon, "sinkwatch_comfyui_jobs_total", "unknown") == 0
        assert len(comfy.prompts) == 5, "reported, not queued again"
        promtool_check(daemon)
        assert daemon.stop() == 0


def test_asked_to_the_daemon_queues_a_lost_video_job_again(
    start_daemon: Callable[..., DaemonProcess], folders: tuple[Path, Path], photos: dict[str, np.ndarray]
) -> None:
    watch, _queue = folders
    with FakeComfyUI(pending_polls=10**9) as comfy:
        daemon = watching(start_daemon, comfy, "--comfyui-requeue-lost", "1")
        lost = sorted(drop(watch, index, photos).stem for index in range(2))
        wait_for(lambda: counter(daemon, "sinkwatch_comfyui_prompts_total", "queued") == 2, timeout=90)
        comfy.restart()
        wait_for(lambda: counter(daemon, "sinkwatch_comfyui_prompts_total", "queued") == 4)

        assert counter(daemon, "sinkwatch_comfyui_jobs_total", "lost") == 2
        images = [p["1"]["inputs"]["image"] for p in comfy.prompts]
        assert sorted(images[2:]) == sorted(images[:2]), "the same frames, sent again"
        assert lost_named(daemon) == lost
        assert len(lost_named(daemon, ending="queuing it again (1 of 1)")) == 1, "the suspect, counted"
        assert daemon.stop() == 0


@pytest.mark.slow
def test_frames_publish_while_comfyui_is_down_and_every_pending_upload_arrives_across_a_restart(
    start_daemon: Callable[..., DaemonProcess], folders: tuple[Path, Path], photos: dict[str, np.ndarray]
) -> None:
    watch, queue = folders
    port = free_port()
    flags = ("--comfyui-url", f"http://127.0.0.1:{port}", "--comfyui-workflow", str(SMOKE))

    first = start_daemon(*flags)
    for index in range(3):
        drop(watch, index, photos)
    wait_published(queue, 3)
    wait_for(lambda: any("ComfyUI is down" in m for m in first.messages()))
    assert counter(first, "sinkwatch_comfyui_uploads_total", "ok") == 0
    assert first.stop() == 0, "a daemon waiting for ComfyUI still stops cleanly"

    second = start_daemon(*flags)
    assert any("resuming 3 uploads" in m for m in second.messages())
    for index in range(3, 5):
        drop(watch, index, photos)
    published = wait_published(queue, 5)

    with fake_comfyui_on(port) as comfy:
        wait_for(lambda: uploaded(comfy, queue, published), timeout=90)
        check_prompts_ran_on_their_frames(comfy, queue, published)
        wait_for(lambda: any("ComfyUI is back" in m for m in second.messages()))
        wait_for(lambda: counter(second, "sinkwatch_comfyui_prompts_total", "queued") == 5)
        assert counter(second, "sinkwatch_comfyui_uploads_total", "ok") == 5
        assert second.stop() == 0


@pytest.mark.slow
def test_comfyui_stopping_mid_run_loses_nothing(
    start_daemon: Callable[..., DaemonProcess], folders: tuple[Path, Path], photos: dict[str, np.ndarray]
) -> None:
    watch, queue = folders
    port = free_port()
    with fake_comfyui_on(port) as comfy:
        daemon = start_daemon("--comfyui-url", f"http://127.0.0.1:{port}")
        drop(watch, 0, photos)
        before = wait_published(queue, 1)
        wait_for(lambda: (comfy.input_dir / "sinkwatch" / before[0].name).exists())
    # ComfyUI is gone now (its server closed); frames keep publishing locally.
    for index in range(1, 4):
        drop(watch, index, photos)
    published = wait_published(queue, 4)
    wait_for(lambda: any("ComfyUI is down" in m for m in daemon.messages()))
    later = [frame for frame in published if frame != before[0]]

    with fake_comfyui_on(port) as comfy:

        def arrived() -> bool:
            return all(
                (comfy.input_dir / "sinkwatch" / f.name).is_file()
                and (comfy.input_dir / "sinkwatch" / f.name).read_bytes() == f.read_bytes()
                for f in later
            )

        wait_for(arrived, timeout=90)
        wait_for(lambda: all(sidecar(queue, f).get("comfyui", {}).get("upload") for f in published))
        wait_for(lambda: counter(daemon, "sinkwatch_comfyui_uploads_total", "ok") == 4)
        assert daemon.stop() == 0


def test_the_comfyui_gauges_show_it_down_with_uploads_pending_then_up_with_none(
    start_daemon: Callable[..., DaemonProcess], folders: tuple[Path, Path], photos: dict[str, np.ndarray]
) -> None:
    watch, queue = folders
    port = free_port()
    daemon = start_daemon("--comfyui-url", f"http://127.0.0.1:{port}")
    assert gauge(daemon, "sinkwatch_comfyui_up") is None, "not known before the first request"
    assert gauge(daemon, "sinkwatch_comfyui_pending_uploads") == 0
    for index in range(2):
        drop(watch, index, photos)
    published = wait_published(queue, 2)
    wait_for(lambda: gauge(daemon, "sinkwatch_comfyui_up") == 0)
    wait_for(lambda: gauge(daemon, "sinkwatch_comfyui_pending_uploads") == 2)
    promtool_check(daemon)

    with fake_comfyui_on(port) as comfy:
        wait_for(lambda: gauge(daemon, "sinkwatch_comfyui_pending_uploads") == 0, timeout=90)
        assert gauge(daemon, "sinkwatch_comfyui_up") == 1
        assert sorted(p.name for p in (comfy.input_dir / "sinkwatch").iterdir()) == [f.name for f in published]
        promtool_check(daemon)
        assert daemon.stop() == 0


# -- runs that end: `sinkwatch process` and `run --once` ----------------------------------


def end_run(command: str, watch: Path, sources: list[Path], flags: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    """`sinkwatch process SOURCES` or `sinkwatch run --once` on the watch folder, with `flags`."""
    if command == "process":
        return run_sinkwatch("process", *map(str, sources), *flags, cwd=watch.parent)
    return run_sinkwatch("run", "--once", "--watch", str(watch), *flags, cwd=watch.parent)


def test_process_sends_its_frames_to_comfyui_before_it_exits(
    folders: tuple[Path, Path], photos: dict[str, np.ndarray]
) -> None:
    watch, queue = folders
    sources = [drop(watch, index, photos) for index in range(3)]
    with FakeComfyUI() as comfy:
        flags = (
            "--queue",
            str(queue),
            "--comfyui-url",
            comfy.url,
            "--comfyui-workflow",
            str(SMOKE),
            "--metrics-port",
            "0",
        )
        done = end_run("process", watch, sources, flags)
        assert done.returncode == 0, done.stderr[-4000:]
        published = sorted(frames(queue))
        assert len(published) == 3
        assert uploaded(comfy, queue, published), "every frame reached ComfyUI before the command returned"
        check_prompts_ran_on_their_frames(comfy, queue, published)
    assert "0 uploads owed to ComfyUI" in done.stderr


@pytest.mark.parametrize(("first", "then"), [("process", "once"), ("once", "process")])
def test_a_run_that_ends_while_comfyui_is_down_says_what_is_owed_exits_1_and_the_next_run_sends_it(
    first: str, then: str, folders: tuple[Path, Path], photos: dict[str, np.ndarray]
) -> None:
    watch, queue = folders
    sources = [drop(watch, index, photos) for index in range(2)]
    port = free_port()
    flags = ("--queue", str(queue), "--comfyui-url", f"http://127.0.0.1:{port}", "--metrics-port", "0")
    done = end_run(first, watch, sources, flags)
    assert done.returncode == 1, done.stderr[-4000:]
    assert "2 uploads to ComfyUI" in done.stderr and "still owed" in done.stderr
    published = sorted(frames(queue))
    assert len(published) == 2, "the local frames are published whatever ComfyUI does"

    with fake_comfyui_on(port) as comfy:
        again = end_run(then, watch, sources, flags)
        assert again.returncode == 0, again.stderr[-4000:]
        stored = sorted(path.name for path in (comfy.input_dir / "sinkwatch").iterdir())
    assert stored == [frame.name for frame in published]
