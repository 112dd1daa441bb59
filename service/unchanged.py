"""Whether a source needs no work now: the ledger's record of it still matches the file.

One rule for a single offer (a watch event, a retry) and for a scan's chunk of
files. A chunk costs one ledger query, not one per file: at every
reconciliation scan most of the watch folder is processed and unchanged.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from service.ledger import FINAL_STATES, Ledger, Stamp


def done(ledger: Ledger, found: Sequence[tuple[str, str | Path]], *, source: str) -> set[str]:
    """The keys among `found` (key, path) whose file needs no work, as found by `source` ("scan", "retry", ...)."""
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
        stamps = ledger.stamps(list(present))
        finished.update(key for key, st in present.items() if _settled(stamps.get(key), st, source))
    return finished


def _settled(stamp: Stamp | None, st: os.stat_result, source: str) -> bool:
    if stamp is None:
        return False
    same_file = (stamp.size, stamp.mtime_ns) == (st.st_size, st.st_mtime_ns)
    if stamp.state in FINAL_STATES:
        return same_file
    if stamp.state == "retry" and source != "retry":
        return same_file  # unchanged: its scheduled retry will come
    return False
