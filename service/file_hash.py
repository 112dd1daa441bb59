"""The sha256 of a file's bytes, for the worker's unchanged-content check and for crash recovery."""

from __future__ import annotations

import hashlib
import io
import os
import stat
from pathlib import Path


def sha256_file(path: Path) -> str | None:
    """The hex sha256 of a regular file's bytes; None for anything else (a folder, a FIFO, a device).

    Opened non-blocking: a FIFO put in the place of a source must not hang the caller in open(). An OSError
    (vanished, unreadable) is the caller's to judge.
    """
    with open_nonblocking(path) as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            return None
        return hashlib.file_digest(handle, "sha256").hexdigest()


def open_nonblocking(path: Path) -> io.BufferedReader:
    """`path` opened for reading without waiting in open() for a writer, should it be a FIFO: the caller then
    checks that it is a regular file."""
    return open(path, "rb", opener=lambda p, flags: os.open(p, flags | getattr(os, "O_NONBLOCK", 0)))
