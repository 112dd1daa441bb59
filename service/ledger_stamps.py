"""The ledger's bulk lookup for scans: state, size and mtime of many sources at once.

At every reconciliation scan most of the watch folder is processed and
unchanged. Asking for a chunk of files in one query costs a fraction of one
`Ledger.get` per file (a transaction, a join with ``names`` and a full `Entry`
each), and a scan needs only what tells whether a file is done.

`StampLedger` is a base class of `service.ledger.Ledger`, which owns the
connection and supplies the transaction helper.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import NamedTuple

from service.ledger_schema import db_key

# SQLite before 3.32 allows at most 999 parameters in one statement.
KEYS_PER_QUERY = 500


class Stamp(NamedTuple):
    """What deciding whether a source is done reads from its ``sources`` row."""

    state: str
    size: int | None
    mtime_ns: int | None


class StampLedger:
    # Provided by Ledger.
    _transaction: Callable[..., AbstractContextManager[sqlite3.Connection]]

    def stamps(self, relpaths: Sequence[str]) -> dict[str, Stamp]:
        """The stamp of each of `relpaths` the ledger knows (the others are left out), in one transaction."""
        wanted = {db_key(relpath): relpath for relpath in relpaths}
        keys = list(wanted)
        found: dict[str, Stamp] = {}
        with self._transaction(write=False) as db:
            for start in range(0, len(keys), KEYS_PER_QUERY):
                chunk = keys[start : start + KEYS_PER_QUERY]
                marks = ", ".join("?" * len(chunk))
                query = f"SELECT relpath, state, size, mtime_ns FROM sources WHERE relpath IN ({marks})"
                for key, state, size, mtime_ns in db.execute(query, chunk):
                    found[wanted[bytes(key)]] = Stamp(state, size, mtime_ns)
        return found
