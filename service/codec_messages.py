"""What the codecs' C code prints to stderr in a worker, kept per job instead of written raw into the log.

libpng, libjpeg and libtiff report oddities of a file (a bad ICC profile, extra
bytes after the image) on the process's stderr, which a worker shares with the
daemon: bare text in a stream of JSON log lines, naming no file, from any
worker. While a job runs, a worker's fd 2 is an in-memory file instead; what
landed there goes back with the job's outcome, and the daemon logs it as
warnings about that source. Outside a job (start-up, shutdown) fd 2 is the
daemon's stderr again, so nothing printed there is lost.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# A file that makes a codec print more than this is saying the same thing over and over.
MAX_LINES = 20
MAX_LINE = 500
_MAX_BYTES = 64 * 1024


class CodecMessages:
    """fd 2 of this process redirected to memory around each call (Linux: ``memfd_create``)."""

    def __init__(self) -> None:
        self._memory = os.memfd_create("sinkwatch-stderr", os.MFD_CLOEXEC)
        self._stderr = os.dup(2)
        os.set_inheritable(self._stderr, False)

    def run(self, call: Callable[[], T]) -> tuple[T, tuple[str, ...]]:
        """``call()``, and the lines printed to stderr while it ran."""
        sys.stderr.flush()
        os.dup2(self._memory, 2)
        try:
            result = call()
        finally:
            sys.stderr.flush()
            os.dup2(self._stderr, 2)
        return result, self._take()

    def _take(self) -> tuple[str, ...]:
        # fd 2 shared the memory file's offset: it ends where the printing ended.
        size = os.lseek(self._memory, 0, os.SEEK_CUR)
        if size == 0:
            return ()
        text = os.pread(self._memory, min(size, _MAX_BYTES), 0).decode("utf-8", errors="replace")
        os.ftruncate(self._memory, 0)
        os.lseek(self._memory, 0, os.SEEK_SET)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        kept = [line if len(line) <= MAX_LINE else line[:MAX_LINE] + "..." for line in lines[:MAX_LINES]]
        if len(lines) > MAX_LINES:
            kept.append(f"... and {len(lines) - MAX_LINES} more lines")
        return tuple(kept)
