"""One sinkwatch per state folder and per queue folder: a second one refuses instead of
processing files twice.

An exclusive `flock` on ``STATE_DIR/sinkwatch.lock`` and another on
``QUEUE/.sinkwatch/queue.lock``. The state lock alone is not enough: a daemon
with its state in /var/lib and a shell `process` with the default state keep
two ledgers, publish into one queue, and a start-up's temp clean-up deletes the
other writer's files mid-publish. The kernel drops a lock when its holder
exits, however it exits (even ``kill -9``), so a stale lock file never blocks a
restart. The holder's pid in the file is only for the message.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from types import TracebackType

from service.errors import ConfigError, FolderBusy

LOCK_NAME = "sinkwatch.lock"
QUEUE_LOCK = Path(".sinkwatch") / "queue.lock"


class InstanceLock:
    """An exclusive lock on `folder`/`name` (by default the state folder's); `guards` is what a refused
    second process is told is in use."""

    def __init__(self, folder: Path, *, name: str = LOCK_NAME, guards: str | None = None) -> None:
        self.folder = folder
        self.path = folder / name
        self.guards = guards or str(folder)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, or raise FolderBusy naming the process that holds it."""
        if self._fd is not None:
            return
        try:
            # Held read-only: flock needs no write access, and a descriptor open for writing would keep its
            # file system from being remounted read-only. Never truncated on open: the file names the holder.
            fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ConfigError(f"cannot open the lock file: {exc.strerror}", path=self.path) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"cannot lock {self.path}: {exc.strerror}", path=self.path) from exc
            who = f"pid {holder}" if holder else "pid unknown"
            raise FolderBusy(f"another sinkwatch ({who}) already uses {self.guards}") from exc
        # The pid only improves the other daemon's message; the lock itself is what counts.
        self._fd = fd
        self._note(f"{os.getpid()}\n")

    def lost(self) -> bool:
        """Whether the lock file we hold was deleted or replaced (its folder removed): it guards nothing now."""
        if self._fd is None:
            return False
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        held = os.fstat(self._fd)
        return (st.st_dev, st.st_ino) != (held.st_dev, held.st_ino)

    def reacquire(self) -> None:
        """Take the lock again on a new lock file at the same path; FolderBusy when another process has it."""
        self.release()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the lock's folder again: {exc.strerror}", path=self.folder) from exc
        self.acquire()

    def release(self) -> None:
        if self._fd is None:
            return
        if not self.lost():  # a replaced file names another holder now
            self._note("")
        fd, self._fd = self._fd, None
        os.close(fd)  # closing the last descriptor drops the flock

    def _note(self, text: str) -> None:
        """Write `text` into the lock file through a descriptor of its own, closed at once."""
        with contextlib.suppress(OSError):
            fd = os.open(self.path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)

    def __enter__(self) -> InstanceLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class QueueLock(InstanceLock):
    """The queue folder's lock, held beside the state lock wherever the state folder is."""

    def __init__(self, queue: Path) -> None:
        super().__init__(queue / QUEUE_LOCK.parent, name=QUEUE_LOCK.name, guards=f"the queue folder {queue}")

    def acquire(self) -> None:
        # QUEUE/.sinkwatch exists already only when the state folder is in its default place inside it.
        try:
            self.folder.mkdir(exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the queue's lock folder: {exc.strerror}", path=self.folder) from exc
        super().acquire()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
