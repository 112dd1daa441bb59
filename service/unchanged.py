"""Whether a source needs no work now: the ledger's record of it still matches the file.

One rule for a single offer (a watch event, a retry) and for a scan's chunk of
files. A chunk costs one ledger query, not one per file: at every
reconciliation scan most of the watch folder is processed and unchanged.

The record is the file's stamp: size, mtime, inode number and ctime. Size and
mtime alone miss new content copied in with the old mtime (``rsync -t``,
``cp -p``): such a copy is a new inode, or a write that moves the ctime, which
no program can set back. A stamp that does not match only costs a look at the
content: the engine hands a published source's hash to the worker, which
skips the file if its bytes hash the same. So inode numbers that change (a
network file system remounted) cost that hashing, never a second publication.

A finished row from a sinkwatch before inodes were recorded is trusted on size
and mtime, as that sinkwatch trusted it, and its inode and ctime are recorded
then: otherwise the first scan after an upgrade would send every processed file
of the watch folder to the workers to be hashed.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path

from service.ledger import FINAL_STATES, Ledger, Stamp
from service.ledger_stamps import file_stamp


def done(
    ledger: Ledger,
    found: Sequence[tuple[str, str | Path]],
    *,
    source: str,
    stamps: Mapping[str, Stamp] | None = None,
) -> set[str]:
    """The keys among `found` (key, path) whose file needs no work, as found by `source` ("scan", "retry", ...);
    `stamps`: the ledger's stamps of those keys, when the caller read them already."""
    finished: set[str] = set()
    present: dict[str, os.stat_result] = {}
    for key, path in found:
        try:
            st = os.stat(path)
        except OSError:
            finished.add(key)  # gone already: nothing to do, nothing lost
            continue
        if stat.S_ISREG(st.st_mode):
            present[key] = st
        else:
            finished.add(key)
    if present:
        if stamps is None:
            stamps = ledger.stamps(list(present))
        legacy = {key: st for key, st in present.items() if _legacy_match(stamps.get(key), st)}
        if legacy:
            ledger.pin_stamps({key: (st.st_ino, st.st_ctime_ns) for key, st in legacy.items()})
        finished.update(legacy)
        finished.update(key for key, st in present.items() if _settled(stamps.get(key), st, source))
    return finished


def _legacy_match(stamp: Stamp | None, st: os.stat_result) -> bool:
    """A finished row without inode and ctime whose size and mtime still hold (see the module docstring)."""
    if stamp is None or stamp.state not in FINAL_STATES or stamp.ino is not None or stamp.size is None:
        return False
    return (stamp.size, stamp.mtime_ns) == (st.st_size, st.st_mtime_ns)


def _settled(stamp: Stamp | None, st: os.stat_result, source: str) -> bool:
    if stamp is None:
        return False
    same_file = stamp.file == file_stamp(st)
    if stamp.state in FINAL_STATES:
        return same_file
    if stamp.state == "retry" and source != "retry":
        return same_file  # unchanged: its scheduled retry will come
    return False
