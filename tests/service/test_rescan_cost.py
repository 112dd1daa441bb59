"""A reconciliation scan over processed files: per-file offers' decisions, one ledger query per chunk.

Real watch folder, ledger, selection and engine (its pool never starts a process: nothing is
dispatched). The reference for every decision is `Engine.offer`, one file at a time, as the
scan worked before it asked the ledger about a whole chunk at once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path

import pytest

from service.discovery import SCAN_FILES_PER_TURN, Discovery
from service.engine import Candidate, Engine
from service.errors import PublishError
from service.ledger import Stamp
from service.runner import Job
from service.selection import Selection
from service.stability import StabilityTracker
from service.watcher import EventQueue
from tests.service.conftest import IdleEngine, file_stamp, replace_keeping_mtime

CONTENT = b"the engine judges size and mtime, it never reads a file here"


class Folder:
    def __init__(self, watch: Path, engine: Engine) -> None:
        self.watch = watch
        self.engine = engine
        self.ledger = engine.ledger
        self.discovery = Discovery(
            selection=Selection(watch, include=("*.png",)),
            events=EventQueue(maxsize=64),
            tracker=StabilityTracker(settle=1.0),
            engine=engine,
        )

    def file(self, name: str, content: bytes = CONTENT) -> Path:
        path = self.watch / name
        path.write_bytes(content)
        return path

    def published(self, name: str) -> Path:
        """A file already processed, recorded the way `service.outcomes` records it."""
        path = self.file(name)
        self.ledger.published(name, **file_stamp(path), sha256="0" * 64, rule="default", fingerprint="f")
        return path

    def scan(self) -> None:
        self.discovery.start_scan("scan")
        while self.discovery.scanning:
            self.discovery.feed_scan()

    def pending(self) -> dict[str, str]:
        return {key: candidate.source for key, candidate in self.engine.pending.items()}


@pytest.fixture
def folder(tmp_path: Path, idle_engine: IdleEngine) -> Folder:
    watch = tmp_path / "watch"
    watch.mkdir()
    return Folder(watch, idle_engine(resolve=lambda key: watch / key, queue_size=64))


def touch_later(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def running(engine: Engine, path: Path, key: str) -> None:
    """Put a job in flight without a worker: what a scan sees while a file is being processed."""
    job = Job(
        source=path, key=key, name=key, rule=engine.rules.select(key), queue=engine.queue, max_bytes=1, max_pixels=1
    )
    engine.in_flight[Future()] = (Candidate(key, path, "event", 0.0), job)


def counting(calls: dict[str, int], name: str, real: Callable[..., object]) -> Callable[..., object]:
    def counted(*args: object, **kwargs: object) -> object:
        calls[name] += 1
        return real(*args, **kwargs)

    return counted


def build_every_case(folder: Folder) -> None:
    folder.published("done.png")
    folder.file("new.png")
    folder.published("resized.png").write_bytes(CONTENT + b"!")
    touch_later(folder.published("touched.png"))
    replace_keeping_mtime(folder.published("replaced.png"), CONTENT.upper())
    folder.published("chmodded.png").chmod(0o600)  # the same bytes: the worker will find them so and skip them
    st = folder.file("recorded-before-inodes.png").stat()
    folder.ledger.published(
        "recorded-before-inodes.png",
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        sha256="0" * 64,
        rule="d",
        fingerprint="f",
    )
    for name, reason in (("bomb.png", "bomb"), ("bomb-fixed.png", "bomb")):
        folder.ledger.rejected(name, reason=reason, message="", **file_stamp(folder.file(name)))
    folder.file("bomb-fixed.png", CONTENT * 2)
    for name in ("waiting.png", "waiting-changed.png", "crashed.png"):
        folder.ledger.start(name, **file_stamp(folder.file(name)), sha256=None, rule="default", fingerprint="f")
    for name in ("waiting.png", "waiting-changed.png"):
        folder.ledger.retry(name, reason="incomplete", message="", next_attempt=1e12)
    touch_later(folder.watch / "waiting-changed.png")
    folder.published("gone.png").unlink()
    folder.file("queued.png")
    folder.engine.offer(Candidate("queued.png", folder.watch / "queued.png", "event", 0.0))
    running(folder.engine, folder.published("busy.png"), "busy.png")


@pytest.mark.parametrize("force", [False, True])
def test_a_scan_offers_exactly_what_per_file_offers_would(
    tmp_path: Path, idle_engine: IdleEngine, folder: Folder, force: bool
) -> None:
    build_every_case(folder)
    reference = idle_engine(resolve=lambda key: folder.watch / key, queue_size=64)  # the same ledger
    reference.pending.update(folder.engine.pending)
    reference.in_flight.update(folder.engine.in_flight)
    folder.engine.force = reference.force = force
    for key, path in folder.discovery.selection.scan_keys():
        reference.offer(Candidate(key, Path(path), "scan", 0.0))

    folder.scan()

    expected = {"queued.png": "event", "new.png": "scan", "resized.png": "scan", "touched.png": "scan"}
    # A row from before inodes were recorded is trusted on size and mtime (service/unchanged.py).
    expected |= {"replaced.png": "scan", "chmodded.png": "scan"}
    expected |= {"bomb-fixed.png": "scan", "waiting-changed.png": "scan", "crashed.png": "scan"}
    if force:
        expected |= {
            "done.png": "scan",
            "bomb.png": "scan",
            "waiting.png": "scan",
            "recorded-before-inodes.png": "scan",
        }
    assert folder.pending() == expected
    assert {key: c.source for key, c in reference.pending.items()} == expected
    assert set(folder.engine.recheck) == set(reference.recheck) == {"busy.png"}, "a running file is rechecked"
    assert folder.engine.pending["new.png"].path == folder.watch / "new.png"


def test_unchanged_processed_files_cost_one_ledger_query_per_chunk_and_no_get(
    folder: Folder, monkeypatch: pytest.MonkeyPatch
) -> None:
    count = 3 * SCAN_FILES_PER_TURN + 5
    for n in range(count):
        folder.published(f"{n:04d}.png")
    for n in range(3):
        folder.ledger.rejected(f"{n:04d}.png", reason="bomb", message="", size=len(CONTENT), mtime_ns=None)
    calls: dict[str, int] = {"get": 0, "stamps": 0}
    statements: list[str] = []
    for method in calls:
        monkeypatch.setattr(folder.ledger, method, counting(calls, method, getattr(folder.ledger, method)))
    folder.ledger._db.set_trace_callback(statements.append)
    try:
        folder.scan()
    finally:
        folder.ledger._db.set_trace_callback(None)
    assert folder.pending() == {}
    chunks = math.ceil(count / SCAN_FILES_PER_TURN)
    assert calls == {"get": 0, "stamps": chunks}
    assert sum(s.lstrip().upper().startswith("SELECT") for s in statements) == chunks


def test_files_the_full_engine_had_no_room_for_are_judged_again_when_offered(
    folder: Folder, idle_engine: IdleEngine
) -> None:
    small = Folder(folder.watch, idle_engine(resolve=lambda key: folder.watch / key, queue_size=1))
    small.file("a-new.png")
    small.file("b-new.png")
    later = small.published("c-done.png")
    vanishing = small.file("d-new.png")
    new = small.file("e-new.png")
    small.discovery.start_scan("scan")
    small.discovery.feed_scan()
    assert small.pending() == {"a-new.png": "scan"}
    touch_later(later)  # changed after the scan listed and first judged it
    vanishing.unlink()
    new.unlink()
    small.file("e-new.png", CONTENT + b"?")
    offered = []
    while small.discovery.scanning:
        small.engine.pending.clear()  # dispatched
        small.discovery.feed_scan()
        offered += list(small.pending())
    assert offered == ["b-new.png", "c-done.png", "e-new.png"]


def test_a_backlog_the_engine_takes_one_file_at_a_time_is_judged_and_marked_once_per_chunk(
    folder: Folder, idle_engine: IdleEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = Folder(folder.watch, idle_engine(resolve=lambda key: folder.watch / key, queue_size=2))
    count = SCAN_FILES_PER_TURN + 40
    for n in range(count):
        small.file(f"{n:04d}.png")
    calls = {"settled": 0, "mark_seen": 0}
    monkeypatch.setattr(small.engine, "settled", counting(calls, "settled", small.engine.settled))
    monkeypatch.setattr(small.ledger, "mark_seen", counting(calls, "mark_seen", small.ledger.mark_seen))
    small.discovery.start_scan("startup", mark=True)
    offered: list[str] = []
    while small.discovery.scanning:
        small.discovery.feed_scan()
        offered += list(small.pending())
        small.engine.pending.popitem(last=False)  # a worker took one: room for one more
    offered += list(small.pending())
    assert sorted(set(offered)) == [f"{n:04d}.png" for n in range(count)]
    # Two chunks, and the empty end of the walk (nothing to mark, nothing to ask the ledger).
    assert calls == {"settled": 3, "mark_seen": 2}


def test_a_listed_file_replaced_by_a_symlink_leaving_the_folder_is_not_offered(
    tmp_path: Path, folder: Folder, idle_engine: IdleEngine
) -> None:
    small = Folder(folder.watch, idle_engine(resolve=lambda key: folder.watch / key, queue_size=1))
    small.file("a-new.png")
    swapped = small.file("b-new.png")
    small.discovery.start_scan("scan")
    small.discovery.feed_scan()
    assert small.pending() == {"a-new.png": "scan"}
    outside = tmp_path / "outside.png"
    outside.write_bytes(CONTENT)
    swapped.unlink()
    swapped.symlink_to(outside)
    small.engine.pending.clear()
    small.discovery.feed_scan()
    assert small.pending() == {} and not small.discovery.scanning


def test_files_of_a_turn_the_ledger_could_not_answer_for_wait_for_the_next_turn(
    folder: Folder, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("a.png", "b.png", "c.png"):
        folder.file(name)
    real = folder.ledger.stamps
    calls = 0

    def failing(relpaths: Sequence[str]) -> dict[str, Stamp]:
        nonlocal calls
        calls += 1
        if calls in (1, 4):  # a turn's bulk lookup; then, the next turn, the single lookup of its second offer
            raise PublishError("ledger: disk I/O error", path=folder.ledger.path, stage="ledger")
        return real(relpaths)

    monkeypatch.setattr(folder.ledger, "stamps", failing)
    folder.discovery.start_scan("scan")
    for _ in range(2):
        with pytest.raises(PublishError):
            folder.discovery.feed_scan()
    assert folder.pending() == {"a.png": "scan"}
    folder.discovery.feed_scan()
    assert folder.pending() == {"a.png": "scan", "b.png": "scan", "c.png": "scan"}
    assert not folder.discovery.scanning
