"""Atomic publishing: ComfyUI never sees a partial or temporary file, failures leave nothing behind."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar, cast

import numpy as np
import pytest
from PIL import Image

from service.errors import PublishError
from service.publish import WATCH_FOLDER_FILE, Publisher, json_bytes

T = TypeVar("T")
NOBODY = 65534


def png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def frames(photos: dict[str, np.ndarray]) -> list[bytes]:
    """Real photographs as PNG bytes, of different sizes."""
    return [png(photos[name]) for name in ("chelsea", "coffee", "astronaut", "rocket")]


@pytest.fixture
def queue(tmp_path: Path) -> Path:
    folder = tmp_path / "queue"
    folder.mkdir()
    return folder


SIDECAR = {"source": {"path": "watch/bild ä.png", "sha256": "ab" * 32}, "rule": {"name": "wan21-480p"}, "n": 1}


def publish(publisher: Publisher, name: str, frames: list[bytes], version: int = 0) -> dict[str, Path]:
    return publisher.publish(
        name, frame=frames[version % 4], heatmap=frames[(version + 1) % 4], sidecar={**SIDECAR, "n": version}
    )


def top_level_files(queue: Path) -> list[str]:
    """What ComfyUI's LoadImage would list: every file at the top, hidden or not."""
    return sorted(entry.name for entry in os.scandir(queue) if not entry.is_dir())


def temp_files(queue: Path) -> list[str]:
    temp = queue / ".sinkwatch" / "tmp"
    return sorted(os.listdir(temp)) if temp.exists() else []


# -- layout and content -------------------------------------------------------


def test_layout(queue: Path) -> None:
    publisher = Publisher(queue)
    assert publisher.frame_path("cat") == queue / "cat.png"
    assert publisher.heatmap_path("cat") == queue / "matrix" / "cat.matrix.png"
    assert publisher.sidecar_path("cat") == queue / "matrix" / "cat.json"
    assert publisher.reject_path("cat") == queue / "rejected" / "cat.json"


def test_publish_writes_the_three_outputs_byte_for_byte(queue: Path, frames: list[bytes]) -> None:
    paths = publish(Publisher(queue), "cat", frames)
    assert paths == {
        "frame": queue / "cat.png",
        "heatmap": queue / "matrix" / "cat.matrix.png",
        "sidecar": queue / "matrix" / "cat.json",
    }
    assert paths["frame"].read_bytes() == frames[0]
    assert paths["heatmap"].read_bytes() == frames[1]
    assert json.loads(paths["sidecar"].read_text(encoding="utf-8")) == {**SIDECAR, "n": 0}
    assert top_level_files(queue) == ["cat.png"]
    assert temp_files(queue) == []


def test_folders_are_created_lazily(tmp_path: Path, frames: list[bytes]) -> None:
    queue = tmp_path / "not" / "yet"
    publisher = Publisher(queue)
    assert not queue.exists(), "constructing a publisher touches nothing"
    publish(publisher, "cat", frames)
    assert (queue / "cat.png").read_bytes() == frames[0]


def test_sidecar_json_is_deterministic(queue: Path, frames: list[bytes]) -> None:
    sidecar = {"zeta": 1, "alpha": {"b": 2, "a": "Bild für Wan"}, "path": Path("x/y.png"), "score": np.float32(0.5)}
    Publisher(queue).publish("cat", frame=frames[0], heatmap=frames[1], sidecar=sidecar)
    raw = (queue / "matrix" / "cat.json").read_bytes()
    expected = (
        '{\n  "alpha": {\n    "a": "Bild für Wan",\n    "b": 2\n  },\n'
        '  "path": "x/y.png",\n  "score": 0.5,\n  "zeta": 1\n}\n'
    )
    assert raw == expected.encode("utf-8")
    assert json_bytes(sidecar) == raw


def test_a_sidecar_json_cannot_hold_fails_before_anything_is_written(queue: Path, frames: list[bytes]) -> None:
    with pytest.raises(TypeError, match="set"):
        Publisher(queue).publish("cat", frame=frames[0], heatmap=frames[1], sidecar={"bad": {1, 2}})
    assert not (queue / "matrix" / "cat.matrix.png").exists()


def test_json_survives_undecodable_source_names() -> None:
    record = {"source": "watch/caf\udce9.png"}
    raw = json_bytes(record)
    raw.decode("utf-8")  # valid UTF-8 on disk
    assert json.loads(raw) == record


def record_syncs_and_renames(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, object]]:
    """From now on, every fsync (of a folder: with its inode) and os.replace (with its target), in order."""
    events: list[tuple[str, object]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        events.append(("fsync-dir", info.st_ino) if stat.S_ISDIR(info.st_mode) else ("fsync-file", None))
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append(("replace", Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_frame_is_published_last_after_every_file_and_its_folder_is_synced(
    queue: Path, frames: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    publisher = Publisher(queue)
    publish(publisher, "warm-up", frames)  # folders exist from here on
    events = record_syncs_and_renames(monkeypatch)
    paths = publish(publisher, "cat", frames)
    matrix, top = ("fsync-dir", (queue / "matrix").stat().st_ino), ("fsync-dir", queue.stat().st_ino)
    assert events == [
        *[("fsync-file", None)] * 3,  # every file's data is on disk before the first rename
        ("replace", paths["heatmap"]),
        ("replace", paths["sidecar"]),
        matrix,  # heatmap and sidecar are durable before the frame appears
        ("replace", paths["frame"]),
        top,  # and the frame before publish() returns
    ]


def test_a_single_file_is_synced_renamed_and_its_folder_synced(queue: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    publisher = Publisher(queue)
    publisher.reject("warm-up", {"reason": "x"})
    events = record_syncs_and_renames(monkeypatch)
    path = publisher.reject("cat", {"reason": "bomb"})
    assert events == [("fsync-file", None), ("replace", path), ("fsync-dir", path.parent.stat().st_ino)]


def test_success_removes_a_stale_reject_record(queue: Path, frames: list[bytes]) -> None:
    publisher = Publisher(queue)
    publisher.reject("cat", {"reason": "incomplete"})
    assert publisher.reject_path("cat").exists()
    publish(publisher, "cat", frames)
    assert not publisher.reject_path("cat").exists()


def test_reject_writes_a_record_atomically(queue: Path) -> None:
    publisher = Publisher(queue)
    path = publisher.reject("cat", {"reason": "bomb", "message": "too many pixels"})
    assert path == queue / "rejected" / "cat.json"
    assert path.read_text(encoding="utf-8") == '{\n  "message": "too many pixels",\n  "reason": "bomb"\n}\n'
    assert top_level_files(queue) == []
    assert temp_files(queue) == []


@pytest.mark.parametrize("name", ["", "../evil", "a/b", "a\\b", ".hidden", "nul\0byte"])
def test_names_that_are_not_one_safe_stem_are_refused(queue: Path, frames: list[bytes], name: str) -> None:
    with pytest.raises(ValueError, match="name"):
        publish(Publisher(queue), name, frames)
    assert list(queue.iterdir()) == []


def test_clean_temp_removes_leftovers_and_counts_them(queue: Path, frames: list[bytes]) -> None:
    publisher = Publisher(queue)
    assert publisher.clean_temp() == 0, "no temp folder yet"
    publish(publisher, "cat", frames)
    for i in range(3):  # what a kill -9 between write and rename leaves
        (queue / ".sinkwatch" / "tmp" / f"123-{i}.tmp").write_bytes(b"half a png")
    assert publisher.clean_temp() == 3
    assert temp_files(queue) == []
    assert (queue / "cat.png").read_bytes() == frames[0], "published files are not temp files"


# -- failures -----------------------------------------------------------------


class Fault:
    """Fail one temp file's `call` with `code`, as a full disk or a dying mount does.

    Injected at the os-level calls the publisher makes (os.open, os.write,
    os.fsync, os.close, os.replace); every other file passes through untouched.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, queue: Path, *, call: str, code: int, nth: int) -> None:
        self.temp_dir = str(queue / ".sinkwatch" / "tmp")
        self.call, self.code, self.nth = call, code, nth
        self.opened = 0
        self.doomed_fd: int | None = None
        self.doomed_path: str | None = None
        self.fired = False
        self.real = {name: getattr(os, name) for name in ("open", "write", "fsync", "close", "replace")}
        for name in self.real:
            monkeypatch.setattr(os, name, getattr(self, name))

    def fail(self) -> None:
        self.fired = True
        raise OSError(self.code, os.strerror(self.code))

    def open(self, path: str | os.PathLike[str], flags: int, mode: int = 0o777, **kwargs: object) -> int:
        is_temp = os.path.dirname(os.fspath(path)) == self.temp_dir
        if is_temp and self.opened == self.nth and self.call == "open":
            self.opened += 1
            self.fail()
        fd: int = self.real["open"](path, flags, mode, **kwargs)
        if is_temp:
            if self.opened == self.nth:
                self.doomed_fd, self.doomed_path = fd, os.fspath(path)
            self.opened += 1
        return fd

    def write(self, fd: int, data: bytes) -> int:
        if fd == self.doomed_fd and self.call == "write":
            if not self.fired and len(data) > 1:
                self.fired = True  # half makes it to disk, then the disk is full
                return int(self.real["write"](fd, memoryview(data)[: len(data) // 2]))
            self.fail()
        return int(self.real["write"](fd, data))

    def fsync(self, fd: int) -> None:
        if fd == self.doomed_fd and self.call == "fsync":
            self.fail()
        self.real["fsync"](fd)

    def close(self, fd: int) -> None:
        self.real["close"](fd)
        if fd == self.doomed_fd:
            self.doomed_fd = None  # the number may be reused by the next file
            if self.call == "close":
                self.fail()

    def replace(self, src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if os.fspath(src) == self.doomed_path and self.call == "replace":
            self.fail()
        self.real["replace"](src, dst)


KINDS = ("heatmap", "sidecar", "frame")  # in publishing order


@pytest.mark.parametrize("call", ["open", "write", "fsync", "close", "replace"])
@pytest.mark.parametrize("nth", [0, 1, 2], ids=KINDS)
def test_injected_enospc_leaves_nothing_partial_and_no_temp(
    queue: Path, frames: list[bytes], monkeypatch: pytest.MonkeyPatch, call: str, nth: int
) -> None:
    publisher = Publisher(queue)
    fault = Fault(monkeypatch, queue, call=call, code=errno.ENOSPC, nth=nth)
    with pytest.raises(PublishError) as raised:
        publish(publisher, "cat", frames)
    assert fault.fired
    error = raised.value
    assert error.transient and error.reason == "publish" and error.stage == "publish"
    assert "ENOSPC" in error.message and "No space left on device" in error.message
    assert isinstance(error.__cause__, OSError) and error.__cause__.errno == errno.ENOSPC
    failed_kind = KINDS[nth]
    expected_paths = {"heatmap": publisher.heatmap_path("cat"), "sidecar": publisher.sidecar_path("cat")}
    expected_paths["frame"] = publisher.frame_path("cat")
    assert error.path == str(expected_paths[failed_kind])
    assert temp_files(queue) == []
    assert top_level_files(queue) == [], "no frame, nothing temporary where ComfyUI looks"
    for kind in KINDS[nth:]:
        assert not expected_paths[kind].exists(), f"{kind} must not exist after its write failed"
    for kind in KINDS[:nth]:
        if call == "replace":  # the files renamed before it stay, whole
            assert expected_paths[kind].read_bytes() in (frames[1], json_bytes({**SIDECAR, "n": 0}))
        else:  # a failed write comes before any rename: nothing of the set is in place
            assert not expected_paths[kind].exists(), f"{kind} must wait for every file to be written"

    monkeypatch.undo()  # space freed
    publish(publisher, "cat", frames)
    assert (queue / "cat.png").read_bytes() == frames[0]
    assert temp_files(queue) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EACCES, errno.EROFS])
def test_injected_failure_replacing_an_existing_frame_keeps_the_old_one_whole(
    queue: Path, frames: list[bytes], monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    publisher = Publisher(queue)
    publish(publisher, "cat", frames, version=0)
    Fault(monkeypatch, queue, call="write", code=code, nth=2)
    with pytest.raises(PublishError, match=errno.errorcode[code]):
        publish(publisher, "cat", frames, version=1)
    assert (queue / "cat.png").read_bytes() == frames[0], "the previous frame, complete"
    assert temp_files(queue) == []


def test_injected_erofs_at_create_is_a_publish_error(
    queue: Path, frames: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    Fault(monkeypatch, queue, call="open", code=errno.EROFS, nth=0)
    with pytest.raises(PublishError, match="EROFS"):
        publish(Publisher(queue), "cat", frames)
    assert top_level_files(queue) == []


def test_interrupt_mid_write_removes_the_temp_file(
    queue: Path, frames: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    publisher = Publisher(queue)
    publish(publisher, "warm-up", frames)
    real_fsync = os.fsync

    def interrupted(fd: int) -> None:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise KeyboardInterrupt
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        publish(publisher, "cat", frames)
    assert temp_files(queue) == []


# -- real permissions ---------------------------------------------------------


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A temp folder every user can enter (pytest's own is private to its user)."""
    folder = Path(tempfile.mkdtemp(prefix="sinkwatch-publish-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        for path in [folder, *folder.rglob("*")]:
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
        shutil.rmtree(folder)


def where_permissions_bind(workdir: Path, action: Callable[[], T]) -> T:
    """Run `action` in `workdir` under file permissions that the kernel enforces.

    A normal user runs it in-process. root ignores permission bits, so as root
    it runs in a forked child that first switches to uid/gid 65534 (nobody);
    its result or exception comes back pickled.
    """
    if os.geteuid() != 0:
        previous = os.getcwd()
        os.chdir(workdir)
        try:
            return action()
        finally:
            os.chdir(previous)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            os.chdir(workdir)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            outcome: tuple[str, object] = ("ok", action())
        except BaseException as exc:
            outcome = ("raised", exc)
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(pickle.dumps(outcome))
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        kind, value = pickle.loads(pipe.read())
    os.waitpid(pid, 0)
    if kind == "raised":
        assert isinstance(value, BaseException)
        raise value
    return cast(T, value)  # what action() returned in the child


def test_read_only_queue_by_permission_bits_fails_cleanly_and_recovers(open_tmp: Path, frames: list[bytes]) -> None:
    """A real EACCES from the kernel (as root: from a child that dropped to uid 65534)."""
    queue = open_tmp / "queue"
    queue.mkdir()
    publisher = Publisher(Path("queue"))  # relative: the child may not enter pytest's private folders

    queue.chmod(0o555)
    with pytest.raises(PublishError, match="EACCES") as raised:
        where_permissions_bind(open_tmp, lambda: publish(publisher, "cat", frames))
    assert raised.value.transient
    assert os.listdir(queue) == []

    queue.chmod(0o777)
    where_permissions_bind(open_tmp, lambda: publish(publisher, "cat", frames, version=0))
    assert (queue / "cat.png").read_bytes() == frames[0]

    # Only the top level read-only: heatmap and sidecar land, the frame's rename is refused.
    queue.chmod(0o555)
    with pytest.raises(PublishError, match="EACCES") as raised:
        where_permissions_bind(open_tmp, lambda: publish(publisher, "cat", frames, version=1))
    assert raised.value.path == str(Path("queue") / "cat.png")
    assert (queue / "cat.png").read_bytes() == frames[0], "the old frame, whole"
    assert temp_files(queue) == []
    assert top_level_files(queue) == ["cat.png"]

    queue.chmod(0o777)
    where_permissions_bind(open_tmp, lambda: publish(publisher, "cat", frames, version=1))
    assert (queue / "cat.png").read_bytes() == frames[1]
    assert temp_files(queue) == []


# -- a concurrent reader --------------------------------------------------------


def test_a_reader_polling_the_queue_only_ever_sees_complete_pngs(queue: Path, frames: list[bytes]) -> None:
    names = [f"frame-{i}" for i in range(5)]
    sizes = {Image.open(io.BytesIO(data)).size for data in frames}
    stop = threading.Event()
    problems: list[str] = []
    checked = [0]

    def reader() -> None:
        while not stop.is_set():
            for entry in os.scandir(queue):
                if entry.is_dir():
                    continue
                stem = entry.name.removesuffix(".png")
                if stem not in names or not entry.name.endswith(".png"):
                    problems.append(f"unexpected file at the top: {entry.name}")
                    continue
                try:
                    with Image.open(entry.path) as image:
                        image.verify()
                    with Image.open(entry.path) as image:
                        image.load()
                        if image.size not in sizes:
                            problems.append(f"{entry.name}: odd size {image.size}")
                except Exception as exc:
                    problems.append(f"{entry.name}: {type(exc).__name__}: {exc}")
                checked[0] += 1

    thread = threading.Thread(target=reader, name="queue-reader")
    thread.start()
    try:
        publisher = Publisher(queue)
        for version in range(60):
            publish(publisher, names[version % len(names)], frames, version=version)
            if version % 10 == 9:
                publisher.reject("not-a-frame", {"reason": "corrupt", "version": version})
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert problems == []
    assert checked[0] > 0, "the reader must actually have read frames"
    assert top_level_files(queue) == sorted(f"{name}.png" for name in names)
    assert temp_files(queue) == []


def test_the_daemons_watch_folder_is_recorded_in_the_queue_once_as_its_real_path(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    publisher = Publisher(tmp_path / "queue")
    assert publisher.watch_folder() is None

    publisher.record_watch_folder(tmp_path / "link")
    recorded = tmp_path / "queue" / WATCH_FOLDER_FILE
    written = recorded.stat()
    publisher.record_watch_folder(tmp_path / "real")

    assert publisher.watch_folder() == f"{tmp_path / 'real'}{os.sep}"
    assert recorded.stat().st_ino == written.st_ino, "the same folder was written again"
    publisher.record_watch_folder(tmp_path)
    assert Publisher(tmp_path / "queue").watch_folder() == f"{tmp_path}{os.sep}"
