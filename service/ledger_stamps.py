"""The ledger's part in scans: state and file stamp of many sources at once, and what a scan no longer finds.

At every reconciliation scan most of the watch folder is processed and
unchanged. Asking for a chunk of files in one query costs a fraction of one
`Ledger.get` per file (a transaction, a join with ``names`` and a full `Entry`
each), and a scan needs only what tells whether a file is done.

`StampLedger` is a base class of `service.ledger.Ledger`, which owns the
connection and supplies the transaction helper.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import NamedTuple

from service.ledger_schema import db_key

# SQLite before 3.32 allows at most 999 parameters in one statement.
KEYS_PER_QUERY = 500


class Stamp(NamedTuple):
    """What deciding whether a source is done reads from its ``sources`` row.

    None is unknown: not recorded yet, or by a sinkwatch from before the column.
    """

    state: str
    size: int | None
    mtime_ns: int | None
    ino: int | None
    ctime_ns: int | None

    @property
    def file(self) -> tuple[int | None, int | None, int | None, int | None]:
        """The recorded counterpart of `file_stamp`."""
        return self.size, self.mtime_ns, self.ino, self.ctime_ns


def file_stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    """What the ledger records of a source to know it again unchanged (see `service.unchanged`)."""
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns


class StampLedger:
    # Provided by Ledger.
    _transaction: Callable[..., AbstractContextManager[sqlite3.Connection]]

    def stamps(self, relpaths: Sequence[str]) -> dict[str, Stamp]:
        """The stamp of each of `relpaths` the ledger knows (the others are left out), in one transaction."""
        wanted = {db_key(relpath): relpath for relpath in relpaths}
        keys = list(wanted)
        found: dict[str, Stamp] = {}
        with self._transaction(write=False) as db:
            for chunk, marks in _in_chunks(keys):
                query = f"SELECT relpath, state, size, mtime_ns, ino, ctime_ns FROM sources WHERE relpath IN ({marks})"
                for key, *stamp in db.execute(query, chunk):
                    found[wanted[bytes(key)]] = Stamp(*stamp)
        return found

    def pin_stamps(self, stamps: Mapping[str, tuple[int, int]]) -> None:
        """Record (inode, ctime_ns) in the rows of `stamps` that have none yet, in one transaction."""
        rows = [(ino, ctime_ns, db_key(relpath)) for relpath, (ino, ctime_ns) in stamps.items()]
        with self._transaction() as db:
            db.executemany("UPDATE sources SET ino = ?, ctime_ns = ? WHERE relpath = ? AND ino IS NULL", rows)

    def mark_seen(self, relpaths: Sequence[str], now: float) -> None:
        """Record that a scan found `relpaths` in the watch folder at wall time `now` (unknown ones: nothing)."""
        with self._transaction() as db:
            for chunk, marks in _in_chunks([db_key(relpath) for relpath in relpaths]):
                db.execute(f"UPDATE sources SET seen = ? WHERE relpath IN ({marks})", [now, *chunk])

    def mark_present(self, relpaths: Sequence[str]) -> None:
        """The files at `relpaths` were found as the ledger recorded them (stamp unchanged): never gone."""
        with self._transaction() as db:
            for chunk, marks in _in_chunks([db_key(relpath) for relpath in relpaths]):
                db.execute(f"UPDATE sources SET gone = NULL WHERE gone IS NOT NULL AND relpath IN ({marks})", chunk)

    def mark_unseen_gone(self, scan_started: float, *, spared: Sequence[str] = ()) -> int:
        """After a scan that marked what it found (started at wall time `scan_started`): the sources it did not
        find, and that were not processed since it started, are gone (see `Ledger.mark_gone`); returns how many.

        The sources at `spared` (keys), and in the folders there, which the scan could not read, count as seen: it
        cannot tell whether they are there, nor whether they are gone for good (see `forget_gone`)."""
        unseen = "max(coalesce(seen, updated), updated) < ?"
        update = f"UPDATE sources SET gone = max(coalesce(gone, 0), ?) WHERE {unseen}"
        keys = [db_key(key) for key in spared]
        within = [(scan_started, key, len(key) + 1, key + b"/") for key in keys]
        with self._transaction() as db:
            db.executemany("UPDATE sources SET seen = ? WHERE relpath = ? OR substr(relpath, 1, ?) = ?", within)
            return int(db.execute(update, (scan_started, scan_started)).rowcount)

    def forget_gone(self, before: float) -> int:
        """Delete the finished rows of sources neither found by a scan nor processed since `before`; returns how
        many. Rows waiting for a retry or in processing are left to their own course.

        Names and settled uploads go with their source, and so do those a source deleted while it waited left
        behind (`Ledger.forget` keeps its name for its return): should it come back, its frame's sidecar tells
        that the frame and its upload are its own. An upload still owed stays.
        """
        gone = "state IN ('published', 'rejected') AND max(coalesce(seen, updated), updated) < ?"
        with self._transaction() as db:
            forgotten = int(db.execute(f"DELETE FROM sources WHERE {gone}", (before,)).rowcount)
            db.execute("DELETE FROM names WHERE relpath NOT IN (SELECT relpath FROM sources)")
            db.execute("DELETE FROM uploads WHERE state != 'pending' AND relpath NOT IN (SELECT relpath FROM sources)")
            return forgotten


def _in_chunks(keys: list[bytes]) -> Iterator[tuple[list[bytes], str]]:
    """`keys` in chunks of at most KEYS_PER_QUERY, each with the placeholders of its ``IN (...)``."""
    for start in range(0, len(keys), KEYS_PER_QUERY):
        chunk = keys[start : start + KEYS_PER_QUERY]
        yield chunk, ", ".join("?" * len(chunk))
