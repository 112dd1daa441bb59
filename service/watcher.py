"""Watching the generator's folder: a watchdog observer whose handler only enqueues.

inotify's close-after-write (``closed``) is the fast path; ``created``,
``modified`` and ``moved`` go to the stability tracker, ``deleted`` (and the
old path of a move) tells the ledger a source left its path; a polling observer
serves network mounts and Docker Desktop, where inotify sees nothing. The
daemon checks `alive()` and calls `restart()`; events lost on an inotify
overflow are found by its reconciliation scan.
"""

from __future__ import annotations

import errno
import os
import queue
import stat
import threading
from concurrent.futures import Future
from pathlib import Path

from loguru import logger
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserverVFS

from service.errors import ConfigError

Event = tuple[str, Path]

# Kinds the daemon acts on besides "deleted" (a file left its path); "rescan" asks for a scan (a folder
# appeared, events were dropped), "rescan-gone" for one that also tells which sources left (a folder went).
FILE_EVENTS = frozenset({"closed", "created", "modified", "moved"})
# The events the handler acts on. Opens and closes without a write (a worker reading its source, a viewer
# browsing the folder) and a folder's own "modified" are left out: inotify is not even asked for them.
HANDLED = (
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    DirCreatedEvent,
    DirMovedEvent,
    DirDeletedEvent,
)


class EventQueue(queue.Queue[Event]):
    """A bounded event queue that remembers it dropped something and wakes the loop waiting on it.

    `arrived()` is a future that completes at the first event (or drop) after
    the last `rearm()`: the daemon's waits include it, so a file closed while
    the loop sleeps is dispatched at once instead of at the end of the tick
    (25 ms of latency on average with a 50 ms tick).
    """

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self.overflowed = False
        self._signal_lock = threading.Lock()
        self._arrived: Future[None] = Future()

    def take_overflow(self) -> bool:
        overflowed, self.overflowed = self.overflowed, False
        return overflowed

    def arrived(self) -> Future[None]:
        return self._arrived

    def rearm(self) -> None:
        """Call before draining the queue: an event put after it completes the new future."""
        with self._signal_lock:
            if self._arrived.done():
                self._arrived = Future()

    def wake(self) -> None:
        with self._signal_lock:
            if not self._arrived.done():
                self._arrived.set_result(None)


class EnqueueHandler(FileSystemEventHandler):
    """Turns watchdog events into (kind, path) items; never raises into the observer."""

    def __init__(self, events: EventQueue) -> None:
        self.events = events

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            kind = event.event_type
            path = event.dest_path if kind == "moved" else event.src_path
            if event.is_directory:
                if kind == "created":
                    self._put("rescan", Path(str(path)))
                elif kind in ("moved", "deleted"):
                    # Its images left their paths (no event each): a scan that marks what it finds tells which.
                    self._put("rescan-gone", Path(str(path)))
                return
            if kind in ("deleted", "moved"):
                self._put("deleted", Path(str(event.src_path)))  # moved out of the folder: "deleted" too
            if kind in FILE_EVENTS:
                self._put(kind, Path(str(path)))
        except Exception:  # a handler error must never kill the observer thread
            logger.exception("watch event handler failed on {}", event)

    def _put(self, kind: str, path: Path) -> None:
        try:
            self.events.put_nowait((kind, path))
        except queue.Full:
            # Backpressure: drop the event and let the reconciliation scan find the file.
            self.events.overflowed = True
        self.events.wake()


class FolderWatcher:
    def __init__(self, root: Path, events: EventQueue, *, recursive: bool, polling: bool, poll_interval: float) -> None:
        self.root = root
        self.events = events
        self.recursive = recursive
        self.polling = polling
        self.poll_interval = poll_interval
        self._observer: BaseObserver | None = None
        self._identity: tuple[int, int] | None = None

    def start(self) -> None:
        identity = _identity(self.root)
        observer: BaseObserver = (
            PollingObserverVFS(_polled_stat, os.scandir, polling_interval=self.poll_interval)
            if self.polling
            else Observer()
        )
        observer.schedule(
            EnqueueHandler(self.events), str(self.root), recursive=self.recursive, event_filter=list(HANDLED)
        )
        try:
            observer.start()
        except OSError as exc:
            observer.stop()
            raise _watch_error(exc, self.root) from exc
        self._observer = observer
        self._identity = identity

    def alive(self) -> bool:
        """Observer and every emitter thread running, on the very folder they were started on.

        A folder moved away and made anew has the same path but another inode;
        inotify would go on watching the old one.
        """
        observer = self._observer
        if observer is None or not observer.is_alive() or _identity(self.root) != self._identity:
            return False
        return all(emitter.is_alive() for emitter in observer.emitters)

    def restart(self) -> None:
        self.stop()
        self.start()

    def stop(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            if observer.is_alive():
                observer.join(timeout=10)


def _polled_stat(path: str) -> os.stat_result:
    """What the polling observer compares from one look at the folder to the next.

    The link itself, not what it leads to: the observer walks into whatever looks like a folder, and a
    link to a folder above (``ln -s . latest``) had it walk the same files 40 levels deep at every poll,
    two such links without end (no new file seen, no stop). And, as the modification time it compares,
    a number that changes with the inode's change time too: new content copied in with its old size and
    mtime (``cp -p``, ``rsync -t``) is a change, as inotify's close of the file is, instead of waiting for
    the next reconciliation scan (a file system whose ctime never changes still has the mtime).
    """
    st = os.lstat(path)
    changed = st.st_mtime_ns + st.st_ctime_ns
    return os.stat_result((*st[:8], changed, st.st_ctime))


def _identity(folder: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def _watch_error(exc: OSError, root: Path) -> ConfigError:
    if exc.errno == errno.ENOSPC:
        return ConfigError(
            "inotify watch limit reached: raise the sysctl fs.inotify.max_user_watches "
            "(e.g. `sysctl fs.inotify.max_user_watches=524288`) or run with --polling",
            path=root,
        )
    if exc.errno == errno.EMFILE:
        return ConfigError(
            "inotify instance limit reached: raise the sysctl fs.inotify.max_user_instances or run with --polling",
            path=root,
        )
    return ConfigError(f"cannot watch the folder: {exc.strerror or exc}", path=root)
