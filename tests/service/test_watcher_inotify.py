"""The inotify observer on a real temp folder: only what the daemon acts on reaches its handler.

Every open of a file in the watch folder (a worker reading its source, an image viewer or a thumbnailer
browsing the generator's output) used to come back as "opened" and "closed_no_write" events, and every
file event as a "modified" event of its folder, each built and dispatched by the observer's threads
only for the handler to drop it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from watchdog.events import FileSystemEvent

from service.watcher import EnqueueHandler, EventQueue, FolderWatcher
from tests.conftest import wait_for


@pytest.fixture
def dispatched(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool, str]]:
    """(kind, is_directory, file name) of each event the observer hands to the daemon's handler."""
    seen: list[tuple[str, bool, str]] = []
    handle = EnqueueHandler.dispatch

    def recording(self: EnqueueHandler, event: FileSystemEvent) -> None:
        seen.append((event.event_type, event.is_directory, Path(str(event.src_path)).name))
        handle(self, event)

    monkeypatch.setattr(EnqueueHandler, "dispatch", recording)
    return seen


@pytest.fixture
def watch(tmp_path: Path) -> Iterator[tuple[Path, EventQueue]]:
    root = tmp_path / "watch"
    (root / "sub").mkdir(parents=True)
    events = EventQueue(maxsize=1000)
    watcher = FolderWatcher(root, events, recursive=True, polling=False, poll_interval=1.0)
    watcher.start()
    yield root, events
    watcher.stop()


def test_reads_in_the_watch_folder_reach_no_handler_and_new_files_still_do(
    watch: tuple[Path, EventQueue], dispatched: list[tuple[str, bool, str]]
) -> None:
    root, events = watch
    old = root / "sub" / "old.png"
    with old.open("wb") as handle:
        handle.write(b"an image written before")
    wait_for(lambda: ("closed", False, "old.png") in dispatched, timeout=10)
    for _ in range(5):
        old.read_bytes()
    with (root / "sub" / "new.png").open("wb") as handle:
        for _ in range(4):  # in pieces, as Pillow writes
            handle.write(b"x" * 65536)
    # inotify keeps the order: once the new file's close arrived, every read before it has been handled.
    wait_for(lambda: ("closed", False, "new.png") in dispatched, timeout=10)
    kinds = {kind for kind, _folder, _name in dispatched}
    assert not kinds & {"opened", "closed_no_write"}, dispatched
    assert not [event for event in dispatched if event[1] and event[0] == "modified"], dispatched
    assert {("created", False, "new.png"), ("modified", False, "new.png")} <= set(dispatched)
    queued = [events.get_nowait() for _ in range(events.qsize())]
    assert ("closed", root / "sub" / "new.png") in queued
    assert {path.name for _kind, path in queued} == {"old.png", "new.png"}
