"""The ledger's ``uploads`` table: the frames owed to a remote ComfyUI.

The table (schema 2) is keyed by output name. A row is written *before* the
upload is attempted, so an upload pending while ComfyUI is down survives a
restart. Each (re)publication of a name bumps its ``generation``; an upload
result only settles the row of the generation it was started for, so the answer
for an older frame never marks a newer one as sent. A name republished while
its upload is still pending keeps its place in line (``queued`` is when it was
first owed): a name republished every few seconds would otherwise go to the
back each time and never be sent while a backlog drains.

The uploader holds at most a bounded number of tasks in memory; the pending
rows are the overflow, read a page at a time (:meth:`UploadLedger.pending_uploads`).

A frame whose workflow ComfyUI queued keeps the fate of that video job in
``job`` (schema 9): ``waiting`` until the daemon's checks see it end
(:mod:`service.comfyui_jobs`); a republication starts over with no job.

`UploadLedger` is a base class of `service.ledger.Ledger`, which owns the
connection and supplies the transaction helper and the clock.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from service.ledger_schema import db_key, db_relpath, db_text

UPLOAD_STATES = ("pending", "done", "failed")
# How the video job of a queued workflow ended (see service.comfyui_jobs); "waiting" before that, NULL: no job.
JOB_ENDS = ("success", "error", "interrupted", "lost", "unknown")

# A row owed again: a new generation, pending, with nothing of what the last one was sent as.
_OWED_AGAIN = """state = 'pending', generation = generation + 1, reference = NULL, prompt_id = NULL,
    reason = NULL, message = NULL, job = NULL"""

# The columns in the order of Upload's fields.
_SELECT_UPLOAD = """
    SELECT name, relpath, width, height, state, generation, reference, prompt_id, reason, message, queued, updated, job,
        requeued
    FROM uploads
"""


@dataclass(frozen=True)
class Upload:
    """A frame owed to (or already sent to) a remote ComfyUI."""

    name: str  # output name (stem) of the published frame
    relpath: str  # the source it was made from
    width: int
    height: int
    state: str  # "pending" | "done" | "failed"
    generation: int
    reference: str | None  # what LoadImage takes: "subfolder/name.png"
    prompt_id: str | None
    reason: str | None
    message: str | None
    queued: float
    updated: float  # when it was owed again or settled: for a queued workflow, when ComfyUI took it
    job: str | None = None  # "waiting", one of JOB_ENDS, or None
    requeued: int = 0  # times a lost job of this frame was queued again as the suspect (see service.comfyui_jobs)


class UploadLedger:
    # Provided by Ledger.
    clock: Callable[[], float]
    _transaction: Callable[..., AbstractContextManager[sqlite3.Connection]]

    def upload_pending(self, name: str, *, relpath: str, width: int, height: int) -> int:
        """Owe ComfyUI the frame `name` (again, if it was republished); returns the new generation."""
        now = self.clock()
        with self._transaction() as db:
            row = db.execute(
                f"""INSERT INTO uploads (name, relpath, width, height, state, generation, queued, updated)
                   VALUES (?, ?, ?, ?, 'pending', 1, ?, ?)
                   ON CONFLICT (name) DO UPDATE SET
                       relpath = excluded.relpath, width = excluded.width, height = excluded.height,
                       {_OWED_AGAIN}, requeued = 0,
                       queued = CASE WHEN state = 'pending' THEN queued ELSE excluded.queued END,
                       updated = excluded.updated
                   RETURNING generation""",
                (db_text(name), db_key(relpath), width, height, now, now),
            ).fetchone()
        return int(row[0])

    def upload_done(self, name: str, *, generation: int, reference: str, prompt_id: str | None = None) -> bool:
        """The frame of that generation reached ComfyUI (and its workflow was queued); False if superseded."""
        return self._settle_upload(
            name, generation, "done", reference=reference, prompt_id=prompt_id, reason=None, message=None
        )

    def prompt_tried(self, name: str, *, generation: int, prompt_id: str) -> None:
        """The workflow of that generation is about to be queued under `prompt_id` (or a try failed without an
        answer): from now on ComfyUI may hold it.

        The row stays pending; a later try, in this run or the next, looks the id up before it sends the workflow.
        """
        with self._transaction() as db:
            db.execute(
                "UPDATE uploads SET prompt_id = ? WHERE name = ? AND generation = ? AND state = 'pending'",
                (db_text(prompt_id), db_text(name), generation),
            )

    def upload_failed(
        self, name: str, *, generation: int, reason: str, message: str, reference: str | None = None
    ) -> bool:
        """Sending it again cannot help (rejected, frame gone); False if superseded."""
        return self._settle_upload(
            name, generation, "failed", reference=reference, prompt_id=None, reason=reason, message=message
        )

    def get_upload(self, name: str) -> Upload | None:
        with self._transaction(write=False) as db:
            row = db.execute(_SELECT_UPLOAD + " WHERE name = ?", (db_text(name),)).fetchone()
        return _upload(row) if row else None

    def uploads(self, state: str | None = None) -> list[Upload]:
        """Uploads in the order they were owed (the oldest first), optionally of one state."""
        if state is not None and state not in UPLOAD_STATES:
            raise ValueError(f"state must be one of {UPLOAD_STATES}, got {state!r}")
        where, params = (" WHERE state = ?", (state,)) if state else ("", ())
        with self._transaction(write=False) as db:
            return [_upload(row) for row in db.execute(_SELECT_UPLOAD + where + " ORDER BY queued, name", params)]

    def pending_uploads(self, *, limit: int) -> list[Upload]:
        """The first `limit` pending uploads in the order they were owed."""
        with self._transaction(write=False) as db:
            rows = db.execute(_SELECT_UPLOAD + " WHERE state = 'pending' ORDER BY queued, name LIMIT ?", (limit,))
            return [_upload(row) for row in rows]

    def pending_upload_count(self) -> int:
        with self._transaction(write=False) as db:
            return int(db.execute("SELECT COUNT(*) FROM uploads WHERE state = 'pending'").fetchone()[0])

    def waiting_jobs(self, *, limit: int) -> list[Upload]:
        """The first `limit` video jobs queued on ComfyUI and not yet seen ended, the longest waiting first."""
        with self._transaction(write=False) as db:
            rows = db.execute(_SELECT_UPLOAD + " WHERE job = 'waiting' ORDER BY updated, name LIMIT ?", (limit,))
            return [_upload(row) for row in rows]

    def job_ended(self, name: str, *, generation: int, prompt_id: str, job: str) -> bool:
        """The video job `prompt_id` of that generation ended as `job`; False if the row moved on meanwhile."""
        if job not in JOB_ENDS:
            raise ValueError(f"job must be one of {JOB_ENDS}, got {job!r}")
        with self._transaction() as db:
            cursor = db.execute(
                """UPDATE uploads SET job = ?
                   WHERE name = ? AND generation = ? AND prompt_id = ? AND job = 'waiting'""",
                (job, db_text(name), generation, db_text(prompt_id)),
            )
            return cursor.rowcount == 1

    def requeue_job(self, name: str, *, generation: int, prompt_id: str, counted: bool) -> int | None:
        """Owe ComfyUI the frame of the waiting job `prompt_id`, which ComfyUI lost, again: a new generation (so a
        new prompt_id) that keeps its place in line, counted in ``requeued`` if `counted`. One write: a failure
        leaves the job waiting. Returns the generation; None if the row moved on meanwhile."""
        with self._transaction() as db:
            row = db.execute(
                f"""UPDATE uploads SET {_OWED_AGAIN}, requeued = requeued + ?, updated = ?
                   WHERE name = ? AND generation = ? AND prompt_id = ? AND job = 'waiting'
                   RETURNING generation""",
                (int(counted), self.clock(), db_text(name), generation, db_text(prompt_id)),
            ).fetchone()
        return None if row is None else int(row[0])

    def upload_counts(self) -> dict[str, int]:
        with self._transaction(write=False) as db:
            rows = db.execute("SELECT state, COUNT(*) FROM uploads GROUP BY state").fetchall()
        return {state: 0 for state in UPLOAD_STATES} | dict(rows)

    def _settle_upload(
        self,
        name: str,
        generation: int,
        state: str,
        *,
        reference: str | None,
        prompt_id: str | None,
        reason: str | None,
        message: str | None,
    ) -> bool:
        with self._transaction() as db:
            cursor = db.execute(
                """UPDATE uploads SET state = ?, reference = ?, prompt_id = ?, reason = ?, message = ?, updated = ?,
                       job = ?
                   WHERE name = ? AND generation = ? AND state = 'pending'""",
                (
                    state,
                    db_text(reference),
                    db_text(prompt_id),
                    db_text(reason),
                    db_text(message),
                    self.clock(),
                    "waiting" if state == "done" and prompt_id is not None else None,
                    db_text(name),
                    generation,
                ),
            )
            return cursor.rowcount == 1


def _upload(row: tuple[Any, ...]) -> Upload:
    name, relpath, *rest = row
    return Upload(name, db_relpath(relpath), *rest)
