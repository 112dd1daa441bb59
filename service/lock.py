"""One sinkwatch per state folder: a second daemon refuses instead of processing files twice.

An exclusive `flock` on ``STATE_DIR/sinkwatch.lock``. The kernel drops it when
the holder exits, however it exits (even ``kill -9``), so a stale lock file
never blocks a restart. The holder's pid in the file is only for the message.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from types import TracebackType

from service.errors import ConfigError

LOCK_NAME = "sinkwatch.lock"


class InstanceLock:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, or raise ConfigError naming the process that holds it."""
        if self._fd is not None:
            return
        try:
            # Never truncate on open: the file names the holder until we hold the lock ourselves.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
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
            raise ConfigError(f"another sinkwatch ({who}) already uses {self.state_dir}") from exc
        # The pid only improves the other daemon's message; the lock itself is what counts.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

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
        """Take the lock again on a new lock file at the same path; ConfigError when another process has it."""
        self.release()
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the state folder again: {exc.strerror}", path=self.state_dir) from exc
        self.acquire()

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the last descriptor drops the flock

    def __enter__(self) -> InstanceLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
