"""What the codecs' C code prints to stderr in a worker, kept per job instead of written raw into the log.

libpng, libjpeg and libtiff report oddities of a file (a bad ICC profile, extra
bytes after the image) on the process's stderr, which a worker shares with the
daemon: bare text in a stream of JSON log lines, naming no file, from any
worker. While a job runs, a worker's fd 2 is a file of its own in a folder the
pool made; what landed there goes back with the job's outcome, and the daemon
logs it as warnings about that source. A worker that dies mid-job (a codec's
segfault or abort) leaves its file behind, and the pool hands the daemon what
it says (:func:`last_words`): often the only clue to the crash. Outside a job
fd 2 is the daemon's stderr again.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

# A file that makes a codec print more than this is saying the same thing over and over.
MAX_LINES = 20
MAX_LINE = 500
_MAX_BYTES = 64 * 1024
SUFFIX = ".stderr"


class CodecMessages:
    """fd 2 of this process redirected to ``folder/<pid>.stderr`` around each call."""

    def __init__(self, folder: Path) -> None:
        self._file = os.open(folder / f"{os.getpid()}{SUFFIX}", os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC)
        self._stderr = os.dup(2)
        os.set_inheritable(self._stderr, False)

    def run(self, call: Callable[[], T]) -> tuple[T, tuple[str, ...]]:
        """``call()``, and the lines printed to stderr while it ran."""
        sys.stderr.flush()
        os.dup2(self._file, 2)
        try:
            result = call()
        finally:
            sys.stderr.flush()
            os.dup2(self._stderr, 2)
            said = self._take()
        return result, said

    def _take(self) -> tuple[str, ...]:
        # fd 2 shared the file's offset: it ends where the printing ended.
        size = os.lseek(self._file, 0, os.SEEK_CUR)
        if size == 0:
            return ()
        said = _lines(os.pread(self._file, min(size, _MAX_BYTES), 0), size)
        os.ftruncate(self._file, 0)
        os.lseek(self._file, 0, os.SEEK_SET)
        return said


def last_words(folder: Path) -> dict[int, tuple[str, ...]]:
    """What the workers whose files are in `folder` printed in a job they did not finish, by pid; the files go."""
    said = {}
    for path in sorted(folder.glob(f"*{SUFFIX}")):
        try:
            data = path.read_bytes()
            path.unlink()
        except OSError:
            continue
        if data.strip():
            said[int(path.stem)] = _lines(data[:_MAX_BYTES], len(data))
    return said


def _lines(data: bytes, size: int) -> tuple[str, ...]:
    """The first lines of what was printed (``data``, the start of ``size`` bytes), each cut to a length."""
    lines = [line.strip() for line in data.decode("utf-8", errors="replace").splitlines() if line.strip()]
    kept = [line if len(line) <= MAX_LINE else line[:MAX_LINE] + "..." for line in lines[:MAX_LINES]]
    if len(lines) > MAX_LINES or size > len(data):
        kept.append(f"... {size} bytes in all")
    return tuple(kept)
