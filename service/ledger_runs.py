"""The ledger's record of the daemon run that last started: in which boot, and whether its stop had begun.

A run killed outright leaves its images in flight (see `service.recovery`).
Whether that kill may have been an image's doing (an out-of-memory kill of the
whole service) is told by what the record says of the run before: a kill in
another boot was the machine going down, one after the stop began was the
stop's own timeout (systemd's ``TimeoutStopSec``, a Kubernetes grace period).

`RunLedger` is a base class of `service.ledger.Ledger`, which owns the
connection and supplies the transaction helper.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import NamedTuple

# A new random id at each boot (Linux).
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


class Run(NamedTuple):
    boot_id: str | None
    stopping: float | None  # wall time the stop began, None while it runs


class RunLedger:
    # Provided by Ledger.
    _transaction: Callable[..., AbstractContextManager[sqlite3.Connection]]
    clock: Callable[[], float]

    def begin_run(self, boot_id: str | None) -> Run | None:
        """Record that a run begins in boot `boot_id`; returns the record of the run before (None: no record)."""
        with self._transaction() as db:
            row = db.execute("SELECT boot_id, stopping FROM runs WHERE id = 1").fetchone()
            db.execute("INSERT OR REPLACE INTO runs (id, boot_id, stopping) VALUES (1, ?, NULL)", (boot_id,))
        return None if row is None else Run(row[0], row[1])

    def run_stopping(self) -> None:
        """The run's stop begins: a kill from here on is the stop's, not an image's."""
        with self._transaction() as db:
            db.execute("UPDATE runs SET stopping = ? WHERE id = 1", (self.clock(),))


def current_boot() -> str | None:
    try:
        return BOOT_ID.read_text(encoding="ascii").strip() or None
    except OSError:
        return None


def kill_may_count(before: Run | None, boot_id: str | None) -> bool:
    """Whether images the run before left in flight may have been what killed it: it ran in this boot, and no
    stop had begun. Unknown (no record, no boot id) counts no kill."""
    return before is not None and boot_id is not None and before.boot_id == boot_id and before.stopping is None
