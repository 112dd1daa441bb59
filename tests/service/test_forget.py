"""The ledger forgets a source gone from the watch folder for --forget-after-days, so that it does not grow for ever.

A real ledger on a wall clock the test sets, a real watch folder, selection and engine (nothing is dispatched: the
scan finds only files the ledger holds as finished); the ledger's rows are what the tests read.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from loguru import logger

from service.discovery import MARK_EVERY, Discovery
from service.errors import PublishError
from service.ledger import Ledger
from service.selection import Selection
from service.stability import StabilityTracker
from service.watcher import EventQueue
from tests.conftest import photo_file
from tests.service.conftest import IdleEngine

DAY = 86400.0
FORGET_AFTER = 30 * DAY


class Clock:
    def __init__(self) -> None:
        self.now = 1.8e9

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(tmp_path: Path, clock: Clock) -> Iterator[Ledger]:
    with Ledger(tmp_path / "state.sqlite3", clock=clock) as opened:
        yield opened


@pytest.fixture
def watch(tmp_path: Path) -> Path:
    folder = tmp_path / "watch"
    folder.mkdir()
    return folder


def discovery(
    watch: Path, ledger: Ledger, idle_engine: IdleEngine, clock: Clock, *, forget: float, recursive: bool = False
) -> Discovery:
    return Discovery(
        selection=Selection(watch, include=("*.png",), recursive=recursive),
        events=EventQueue(maxsize=8),
        tracker=StabilityTracker(settle=1.0),
        engine=idle_engine(resolve=lambda key: watch / key, ledger=ledger),
        forget_after=forget,
        wall=clock,
    )


def finished(ledger: Ledger, watch: Path, name: str, *, present: bool) -> None:
    """A source the ledger holds as finished (rejected: its row needs no outputs), its file there or not."""
    path = watch / name
    shutil.copyfile(photo_file("chelsea"), path)
    st = path.stat()
    ledger.start(name, size=st.st_size, mtime_ns=st.st_mtime_ns, ino=st.st_ino, ctime_ns=st.st_ctime_ns,
                 sha256=None, rule="default", fingerprint="f")  # fmt: skip
    ledger.name_for(name, Path(name).stem, exists=lambda _name: False)
    ledger.rejected(name, reason="corrupt", message="for the test")
    if not present:
        path.unlink()


def scan(found: Discovery) -> None:
    found.start_scan("scan")
    while found.scanning:
        found.feed_scan()


def names(ledger: Ledger) -> set[str]:
    return {entry.relpath for entry in ledger.entries()}


def test_a_source_gone_for_longer_than_forget_after_is_forgotten_with_its_name(
    watch: Path, ledger: Ledger, idle_engine: IdleEngine, clock: Clock
) -> None:
    for name, present in (("kept.png", True), ("gone.png", False), ("lately_gone.png", False)):
        finished(ledger, watch, name, present=present)
    found = discovery(watch, ledger, idle_engine, clock, forget=FORGET_AFTER)
    scan(found)  # marks kept.png as seen now
    assert names(ledger) == {"kept.png", "gone.png", "lately_gone.png"}, "nothing is gone for 30 days yet"

    clock.now += 25 * DAY
    finished(ledger, watch, "lately_gone.png", present=False)  # processed again, then deleted
    clock.now += 6 * DAY
    scan(found)
    assert names(ledger) == {"kept.png", "lately_gone.png"}
    assert ledger.name_for("other/gone.png", "gone", exists=lambda _name: False) == "gone", "its name is free again"
    assert ledger.name_for("kept.png", "other", exists=lambda _name: True) == "kept", "a kept one keeps its name"


def test_a_scan_whose_gone_marks_the_ledger_could_not_write_ends_once_it_can(
    watch: Path, ledger: Ledger, idle_engine: IdleEngine, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk at a marking scan's last write: the scan ended anyway, and no scan marked again for a day."""
    finished(ledger, watch, "kept.png", present=True)
    finished(ledger, watch, "gone.png", present=False)
    found = discovery(watch, ledger, idle_engine, clock, forget=FORGET_AFTER)
    write = ledger.mark_unseen_gone
    failures = iter([PublishError("ledger: database or disk is full", path=ledger.path, stage="ledger")])

    def full_once(*args: object, **kwargs: object) -> None:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        write(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ledger, "mark_unseen_gone", full_once)
    clock.now += 60.0
    found.start_scan("startup", mark=True)
    with pytest.raises(PublishError):
        while found.scanning:
            found.feed_scan()
    assert found.scanning, "the scan ended with its marks unwritten"
    found.feed_scan()

    assert not found.scanning
    assert {entry.relpath: entry.gone is not None for entry in ledger.entries()} == {
        "kept.png": False,
        "gone.png": True,
    }
    assert found.marked_at == clock.now


def test_a_source_present_all_along_is_kept_however_old_its_row(
    watch: Path, ledger: Ledger, idle_engine: IdleEngine, clock: Clock
) -> None:
    finished(ledger, watch, "old.png", present=True)
    found = discovery(watch, ledger, idle_engine, clock, forget=FORGET_AFTER)
    for _ in range(4):
        clock.now += 20 * DAY
        scan(found)
    assert names(ledger) == {"old.png"}


def test_an_empty_listing_forgets_nothing(watch: Path, ledger: Ledger, idle_engine: IdleEngine, clock: Clock) -> None:
    # A network mount not up: its mount point is an empty folder. Nothing says the sources are gone.
    finished(ledger, watch, "a.png", present=False)
    clock.now += 40 * DAY
    scan(discovery(watch, ledger, idle_engine, clock, forget=FORGET_AFTER))
    assert names(ledger) == {"a.png"}


def test_the_sources_in_a_subfolder_a_scan_cannot_read_are_neither_gone_nor_forgotten(
    watch: Path, ledger: Ledger, idle_engine: IdleEngine, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subfolder closed to the daemon's user, or a mount in it not answering (injected at os.scandir: tests may
    run as root). Marked gone, each of its sources' next edit went to a new name; after 30 days, forgotten."""
    for folder in ("locked", "open"):
        (watch / folder).mkdir()
    finished(ledger, watch, "locked/a.png", present=True)
    finished(ledger, watch, "open/b.png", present=False)
    finished(ledger, watch, "top.png", present=True)
    listing = os.scandir

    def scandir(path: str) -> Iterator[os.DirEntry[str]]:
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", path)
        return listing(path)

    monkeypatch.setattr(os, "scandir", scandir)
    found = discovery(watch, ledger, idle_engine, clock, forget=FORGET_AFTER, recursive=True)
    clock.now += 60.0
    scan(found)
    gone = {entry.relpath: entry.gone is not None for entry in ledger.entries()}
    assert gone == {"locked/a.png": False, "open/b.png": True, "top.png": False}

    clock.now += 40 * DAY
    scan(found)
    assert names(ledger) == {"locked/a.png", "top.png"}


class Unanswering:
    """A directory entry whose kind cannot be told (a mount point whose server is gone: EIO)."""

    def __init__(self, entry: os.DirEntry[str]) -> None:
        self.name, self.path = entry.name, entry.path

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        raise OSError(5, "Input/output error", self.path)

    is_file = is_dir


def test_the_sources_below_an_entry_a_scan_cannot_tell_a_kind_of_are_not_gone(
    watch: Path, ledger: Ledger, idle_engine: IdleEngine, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    (watch / "mnt").mkdir()
    finished(ledger, watch, "mnt/a.png", present=True)
    finished(ledger, watch, "gone.png", present=False)
    listing = os.scandir

    @contextlib.contextmanager
    def scandir(path: str) -> Iterator[list[object]]:
        with listing(path) as entries:
            yield [Unanswering(entry) if entry.name == "mnt" else entry for entry in entries]

    monkeypatch.setattr(os, "scandir", scandir)
    clock.now += 60.0
    warnings: list[str] = []
    sink = logger.add(lambda message: warnings.append(message.record["message"]), level="WARNING")
    try:
        found = discovery(watch, ledger, idle_engine, clock, forget=FORGET_AFTER, recursive=True)
        scan(found)
        scan(found)
    finally:
        logger.remove(sink)
    gone = {entry.relpath: entry.gone is not None for entry in ledger.entries()}
    assert gone == {"mnt/a.png": False, "gone.png": True}
    mount = watch / "mnt"
    assert warnings == [f"cannot tell what {mount} is (Input/output error): its images wait until it can be read"]


def test_a_file_a_scan_cannot_tell_the_kind_of_is_said_each_time_it_cannot_and_when_it_can_again(
    watch: Path, ledger: Ledger, idle_engine: IdleEngine, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    finished(ledger, watch, "b.png", present=True)
    listing = os.scandir
    failing = [True]  # whether the entry answers, scan by scan

    @contextlib.contextmanager
    def scandir(path: str) -> Iterator[list[object]]:
        with listing(path) as entries:
            yield [Unanswering(entry) if entry.name == "b.png" and failing[-1] else entry for entry in entries]

    monkeypatch.setattr(os, "scandir", scandir)
    said: list[str] = []
    sink = logger.add(lambda message: said.append(message.record["message"]), level="INFO")
    try:
        found = discovery(watch, ledger, idle_engine, clock, forget=FORGET_AFTER)
        for fails in (True, True, False, True):
            failing.append(fails)
            scan(found)
    finally:
        logger.remove(sink)
    file = watch / "b.png"
    cannot = f"cannot tell what {file} is (Input/output error): its images wait until it can be read"
    assert [m for m in said if str(file) in m] == [cannot, f"{file} can be read again", cannot]


def test_a_watch_folder_that_cannot_be_listed_says_nothing_of_what_left_it(
    watch: Path, ledger: Ledger, idle_engine: IdleEngine, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A network share answering its mount point's stat but not a listing (EIO, ESTALE)."""
    finished(ledger, watch, "a.png", present=True)
    listing = os.scandir

    def scandir(path: str) -> Iterator[os.DirEntry[str]]:
        if Path(path) == watch:
            raise OSError(5, "Input/output error", path)
        return listing(path)

    monkeypatch.setattr(os, "scandir", scandir)
    clock.now += 40 * DAY
    scan(discovery(watch, ledger, idle_engine, clock, forget=FORGET_AFTER))
    entry = ledger.get("a.png")
    assert entry is not None and entry.gone is None


def test_a_row_waiting_for_a_retry_is_left_to_the_retries(
    watch: Path, ledger: Ledger, idle_engine: IdleEngine, clock: Clock
) -> None:
    finished(ledger, watch, "present.png", present=True)
    path = watch / "waiting.png"
    path.write_bytes(b"x")
    ledger.start("waiting.png", size=1, mtime_ns=1, sha256=None, rule="default", fingerprint="f")
    ledger.retry("waiting.png", reason="incomplete", message="", next_attempt=clock.now + 1e9)
    path.unlink()
    clock.now += 40 * DAY
    scan(discovery(watch, ledger, idle_engine, clock, forget=FORGET_AFTER))
    assert names(ledger) == {"present.png", "waiting.png"}


def test_forget_after_0_keeps_every_row_and_still_tells_what_is_gone(
    watch: Path, ledger: Ledger, idle_engine: IdleEngine, clock: Clock
) -> None:
    finished(ledger, watch, "present.png", present=True)
    finished(ledger, watch, "gone.png", present=False)
    found = discovery(watch, ledger, idle_engine, clock, forget=0.0)
    clock.now += 400 * DAY
    scan(found)
    assert names(ledger) == {"present.png", "gone.png"}
    assert found.marked_at == clock.now
    assert [getattr(ledger.get(key), "gone", "no row") for key in ("present.png", "gone.png")] == [None, clock.now]


def test_a_scan_marks_what_it_finds_once_a_day_at_most(
    watch: Path, ledger: Ledger, idle_engine: IdleEngine, clock: Clock
) -> None:
    finished(ledger, watch, "present.png", present=True)
    found = discovery(watch, ledger, idle_engine, clock, forget=FORGET_AFTER)
    scan(found)
    first = found.marked_at
    clock.now += MARK_EVERY / 2
    scan(found)
    assert found.marked_at == first, "the rescan a minute later wrote nothing"
    clock.now += MARK_EVERY / 2
    scan(found)
    assert found.marked_at == clock.now


def test_names_and_settled_uploads_go_with_their_sources_and_an_owed_upload_stays(
    watch: Path, ledger: Ledger, idle_engine: IdleEngine, clock: Clock
) -> None:
    for name, present in (("kept.png", True), ("gone.png", False), ("owed.png", False)):
        finished(ledger, watch, name, present=present)
    for name in ("kept", "gone", "owed"):
        ledger.upload_pending(name, relpath=f"{name}.png", width=832, height=480)
    for name in ("kept", "gone"):
        ledger.upload_done(name, generation=1, reference=f"{name}.png")
    # Deleted while it waited for a retry: its row is dropped at once, its name kept for its return.
    (watch / "vanished.png").write_bytes(b"x")
    ledger.start("vanished.png", size=1, mtime_ns=1, sha256=None, rule="default", fingerprint="f")
    ledger.name_for("vanished.png", "vanished", exists=lambda _name: False)
    ledger.retry("vanished.png", reason="incomplete", message="", next_attempt=clock.now + 60)
    (watch / "vanished.png").unlink()
    ledger.forget("vanished.png")
    assert ledger.name_for("other/vanished.png", "vanished", exists=lambda _name: False) != "vanished"

    clock.now += 31 * DAY
    scan(discovery(watch, ledger, idle_engine, clock, forget=FORGET_AFTER))
    assert names(ledger) == {"kept.png"}
    assert {(upload.name, upload.state) for upload in ledger.uploads()} == {("kept", "done"), ("owed", "pending")}
    assert ledger.name_for("later/vanished.png", "vanished", exists=lambda _name: False) == "vanished"
    assert ledger.name_for("later/gone.png", "gone", exists=lambda _name: False) == "gone"
    assert ledger.name_for("kept.png", "other", exists=lambda _name: True) == "kept"


def test_a_scan_of_an_empty_folder_tells_that_its_sources_left_and_one_of_no_folder_does_not(
    tmp_path: Path, watch: Path, ledger: Ledger, idle_engine: IdleEngine, clock: Clock
) -> None:
    """Cleared while the daemon was stopped, ComfyUI then counting from 1 again: an empty listing is news.
    A folder that is not there (a mount not up) tells nothing, and nothing is forgotten either way."""
    finished(ledger, watch, "a.png", present=False)
    missing = discovery(tmp_path / "not-mounted", ledger, idle_engine, clock, forget=FORGET_AFTER)
    clock.now += 40 * DAY
    scan(missing)
    assert getattr(ledger.get("a.png"), "gone", "no row") is None and missing.marked_at is None

    empty = discovery(watch, ledger, idle_engine, clock, forget=FORGET_AFTER)
    scan(empty)
    assert getattr(ledger.get("a.png"), "gone", "no row") == clock.now and empty.marked_at == clock.now


def test_a_scan_leaves_a_file_an_event_told_of_to_that_event(
    watch: Path, ledger: Ledger, idle_engine: IdleEngine, clock: Clock
) -> None:
    """An editor's save by a rename: the scan would see a new inode where the event, once the file settles,
    tells an edit."""
    found = discovery(watch, ledger, idle_engine, clock, forget=0.0)
    edited = watch / "edited.png"
    shutil.copyfile(photo_file("chelsea"), edited)
    found.tracker.observe(edited)
    shutil.copyfile(photo_file("coffee"), watch / "other.png")
    scan(found)
    assert list(found.engine.pending) == ["other.png"]


def test_a_folder_mounted_after_the_first_scan_brings_its_sources_back(
    tmp_path: Path, watch: Path, ledger: Ledger, idle_engine: IdleEngine, clock: Clock
) -> None:
    """Started on the empty mount point, every source looked gone; found as recorded once mounted, none is."""
    finished(ledger, watch, "a.png", present=True)
    mount_point = tmp_path / "mount-point"
    mount_point.mkdir()
    clock.now += 60
    scan(discovery(mount_point, ledger, idle_engine, clock, forget=FORGET_AFTER))
    assert getattr(ledger.get("a.png"), "gone", "no row") == clock.now

    clock.now += 60
    mounted = discovery(watch, ledger, idle_engine, clock, forget=FORGET_AFTER)
    mounted.start_scan("scan", mark=True)
    while mounted.scanning:
        mounted.feed_scan()
    assert getattr(ledger.get("a.png"), "gone", "no row") is None
