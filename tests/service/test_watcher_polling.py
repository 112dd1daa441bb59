"""`--polling`: the polling observer on real temp folders (what Docker Desktop and network mounts get).

It must not walk into linked folders (a loop of links made every poll endless: no new file seen, no
stop), and new content copied in with its old size and mtime must be a change, as inotify's close is.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.watcher import Event, EventQueue, FolderWatcher

POLL = 0.05


@pytest.fixture
def watching(tmp_path: Path) -> Iterator[tuple[Path, EventQueue, FolderWatcher]]:
    root = tmp_path / "watch"
    (root / "sub").mkdir(parents=True)
    events = EventQueue(maxsize=1000)
    watcher = FolderWatcher(root, events, recursive=True, polling=True, poll_interval=POLL)
    yield root, events, watcher
    watcher.stop()


def events_for(events: EventQueue, path: Path, *, timeout: float = 10.0) -> set[str]:
    """The kinds of the events about `path` that arrive within `timeout` (until the first)."""
    deadline = time.monotonic() + timeout
    kinds: set[str] = set()
    while not kinds and time.monotonic() < deadline:
        while not events.empty():
            event: Event = events.get_nowait()
            if event[1] == path:
                kinds.add(event[0])
        time.sleep(POLL)
    return kinds


def test_links_to_folders_above_are_not_walked_and_new_files_are_seen(
    watching: tuple[Path, EventQueue, FolderWatcher],
) -> None:
    root, events, watcher = watching
    (root / "latest").symlink_to(".")
    (root / "sub" / "up").symlink_to("..")
    started = threading.Thread(target=watcher.start, daemon=True)
    started.start()
    started.join(timeout=30)
    assert not started.is_alive(), "the first look at the folder never ended"

    (root / "sub" / "new.png").write_bytes(b"a new image")
    assert events_for(events, root / "sub" / "new.png") >= {"created"}
    stopping = threading.Thread(target=watcher.stop, daemon=True)
    stopping.start()
    stopping.join(timeout=30)
    assert not stopping.is_alive(), "the observer did not stop"


def test_new_content_with_the_old_size_and_mtime_is_a_change(
    watching: tuple[Path, EventQueue, FolderWatcher],
) -> None:
    root, events, watcher = watching
    image = root / "image.png"
    image.write_bytes(b"first content")
    st = image.stat()
    watcher.start()
    time.sleep(3 * POLL)
    while not events.empty():
        events.get_nowait()

    image.write_bytes(b"other content")  # what cp -p or rsync -t leave: same size, mtime put back
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert image.stat().st_size == st.st_size and image.stat().st_mtime_ns == st.st_mtime_ns
    assert events_for(events, image) == {"modified"}
