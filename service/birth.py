"""When a file was made: statx's birth time, which tells another file at a path from the same file rewritten.

The inode number cannot: ext4 gives a file made right after a deletion the
inode just freed (measured: ComfyUI's next image after a cleared folder had
its predecessor's inode). Python 3.11 has no ``os.statx``, so glibc's
``statx`` (2.28 on) is called through ctypes; where it, or a birth time from
the file system, is missing, the answer is None and the inode alone decides.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

_AT_FDCWD = -100
_STATX_BTIME = 0x800
_STATX_SIZE = 256  # struct statx, padding included
_MASK = slice(0, 4)  # __u32 stx_mask: what the file system filled in
_BTIME = 80  # struct statx_timestamp stx_btime: __s64 tv_sec, __u32 tv_nsec

_libc = ctypes.CDLL(None, use_errno=True)
_statx = getattr(_libc, "statx", None)
if _statx is not None:
    _statx.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_char_p)
    _statx.restype = ctypes.c_int


def birth_ns(path: str | Path) -> int | None:
    """The birth time of the file at `path` (links followed) in nanoseconds, or None where none is known."""
    if _statx is None:
        return None
    buffer = ctypes.create_string_buffer(_STATX_SIZE)
    if _statx(_AT_FDCWD, os.fsencode(path), 0, _STATX_BTIME, buffer) != 0:
        return None
    raw = buffer.raw
    if not int.from_bytes(raw[_MASK], "little") & _STATX_BTIME:
        return None
    seconds = int.from_bytes(raw[_BTIME : _BTIME + 8], "little", signed=True)
    return seconds * 1_000_000_000 + int.from_bytes(raw[_BTIME + 8 : _BTIME + 12], "little")
