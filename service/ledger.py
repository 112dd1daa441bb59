"""The ledger: what happened to every source, so nothing is processed twice or lost.

SQLite in the state folder, one transaction per method. WAL lets a reader
(a status command, a test) look while the daemon writes. ``synchronous=FULL``
makes every commit durable before the method returns; that ordering matters:
an output name is on disk before any file carries it, so a power cut can
never make a rerun pick a second name for an image already published. A
commit costs one WAL fsync, small beside the five fsyncs of a publication.

This module holds the connection and the ``sources`` and ``names`` tables;
the schema and its migrations are in `service.ledger_schema`, the ``uploads``
table in `service.ledger_uploads` and the scans' bulk lookup of ``sources`` in
`service.ledger_stamps` (base classes of `Ledger`).
"""

from __future__ import annotations

import itertools
import math
import os
import sqlite3
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from service.errors import ConfigError, PublishError
from service.ledger_runs import RunLedger
from service.ledger_schema import MIGRATIONS, SCHEMA_VERSION, db_key, db_relpath, db_text, migrate
from service.ledger_stamps import Stamp, StampLedger
from service.ledger_uploads import UPLOAD_STATES, Upload, UploadLedger
from service.naming import disambiguated

# Callers import the whole ledger API from here, including what ledger_schema and ledger_uploads define.
__all__ = [
    "FINAL_STATES",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "STATES",
    "UPLOAD_STATES",
    "Entry",
    "Ledger",
    "Stamp",
    "Upload",
]

STATES = ("processing", "published", "rejected", "retry")
# Names looked at for a frame a source already has in the queue when the ledger has none on record.
OWN_NAMES_LOOKED_AT = 4
FINAL_STATES = ("published", "rejected")

# The columns in the order of Entry's fields.
_SELECT_ENTRY = """
    SELECT s.relpath, s.size, s.mtime_ns, s.sha256, s.rule, s.fingerprint, s.state, n.name,
           s.attempts, s.next_attempt, s.reason, s.message, s.updated, s.frame_sha256, s.gone, s.ino, s.born
    FROM sources AS s LEFT JOIN names AS n ON n.relpath = s.relpath
"""


@dataclass(frozen=True)
class Entry:
    relpath: str
    size: int | None
    mtime_ns: int | None
    sha256: str | None
    rule: str | None
    fingerprint: str | None
    state: str
    output_name: str | None
    attempts: int
    next_attempt: float | None
    reason: str | None
    message: str | None
    updated: float
    frame_sha256: str | None = None  # of the frame last published under output_name
    gone: float | None = None  # when the source was found deleted or moved away, until published again
    ino: int | None = None  # of the file last started or published
    born: int | None = None  # birth time (ns) of the file last started, where the file system tells it


class Ledger(UploadLedger, StampLedger, RunLedger):
    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self._lock = threading.Lock()
        try:
            self._db = _connect(path)
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open the ledger: {exc}", path=path) from exc
        try:
            with self._transaction() as db:
                migrate(db, path=path)
            self._identity = _identity(path)
        except (sqlite3.Error, PublishError) as exc:
            self._db.close()
            detail = exc.message if isinstance(exc, PublishError) else str(exc)
            raise ConfigError(f"cannot open the ledger: {detail}", path=path) from exc
        except BaseException:
            self._db.close()
            raise

    def moved(self) -> bool:
        """Whether the ledger file was deleted or replaced under the open connection (its folder removed)."""
        return _identity(self.path) != self._identity

    def rewrite(self) -> None:
        """Write what the open connection holds back to `path` and go on with that file.

        A PublishError (transient: the daemon pauses and tries again) leaves the open connection in use.
        """
        with self._lock:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                target = _connect(self.path)
                try:
                    self._db.backup(target)
                except BaseException:
                    target.close()
                    raise
            except (OSError, sqlite3.Error) as exc:
                raise PublishError(f"cannot write the ledger back: {exc}", path=self.path) from exc
            self._db.close()
            self._db = target
            self._identity = _identity(self.path)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- reading --------------------------------------------------------------

    def get(self, relpath: str) -> Entry | None:
        with self._transaction(write=False) as db:
            row = db.execute(_SELECT_ENTRY + " WHERE s.relpath = ?", (db_key(relpath),)).fetchone()
        return _entry(row) if row else None

    def due(self, now: float, *, latest: float = math.inf) -> list[Entry]:
        """Entries waiting to be retried whose time has come, the longest-waiting first.

        Retry times are wall-clock times (they outlive the process). No retry is set for after `latest`
        (now plus the longest delay): one that is was set by a clock since set back, and is due too.
        """
        query = (
            _SELECT_ENTRY + " WHERE s.state = 'retry' AND (s.next_attempt <= ? OR s.next_attempt > ?)"
            " ORDER BY s.next_attempt, s.relpath"
        )
        with self._transaction(write=False) as db:
            return [_entry(row) for row in db.execute(query, (now, latest))]

    def entries(self, state: str | None = None) -> list[Entry]:
        if state is not None and state not in STATES:
            raise ValueError(f"state must be one of {STATES}, got {state!r}")
        where, params = (" WHERE s.state = ?", (state,)) if state else ("", ())
        with self._transaction(write=False) as db:
            return [_entry(row) for row in db.execute(_SELECT_ENTRY + where + " ORDER BY s.relpath", params)]

    def count(self, state: str) -> int:
        """Rows in `state`, counted on the state index: cheap however large the ledger."""
        with self._transaction(write=False) as db:
            return int(db.execute("SELECT COUNT(*) FROM sources WHERE state = ?", (state,)).fetchone()[0])

    def counts(self) -> dict[str, int]:
        with self._transaction(write=False) as db:
            rows = db.execute("SELECT state, COUNT(*) FROM sources GROUP BY state").fetchall()
        return {state: 0 for state in STATES} | dict(rows)

    # -- names ----------------------------------------------------------------

    def name_for(
        self,
        relpath: str,
        stem: str,
        *,
        exists: Callable[[str], bool],
        instead_of: str | None = None,
        own: Callable[[str], bool] = lambda _name: False,
    ) -> str:
        """The output name of `relpath`: the one it already has, else the first free of
        `stem`, ``stem-<hash>``, ``stem-<hash>-2``, ... (free: no other source owns it,
        compared case-insensitively, and ``exists(name)`` is False).

        Without a recorded name, one of the first :data:`OWN_NAMES_LOOKED_AT` of those whose frame in the
        queue is already this source's (``own(name)``) goes first: a ledger lost or moved must not hand
        `stem` to another source whose name differs only in case and send both to new names.

        `instead_of`: the name it has is lost to it (someone else's file is there now, or the frame of an
        earlier image at its path), so a new one is chosen; the lost name is retired, never handed out again.
        """
        key = db_key(relpath)
        lost = None if instead_of is None else _fold(instead_of)
        with self._transaction() as db:
            row = db.execute("SELECT name, folded FROM names WHERE relpath = ?", (key,)).fetchone()
            if row and row[1] != lost:
                return str(row[0])
            if row:
                # Its file stays in the queue, and this source could take the name again (the frame of an earlier
                # image at its path is its "own"): retired for good. The recorded frame hash was of that frame.
                db.execute(
                    "INSERT OR IGNORE INTO retired (folded, name, relpath, retired) VALUES (?, ?, ?, ?)",
                    (row[1], row[0], key, self.clock()),
                )
                db.execute("DELETE FROM names WHERE relpath = ?", (key,))
                db.execute("UPDATE sources SET frame_sha256 = NULL WHERE relpath = ?", (key,))
            candidates = itertools.chain(
                (stem, disambiguated(stem, relpath)),
                (disambiguated(stem, relpath, counter=n) for n in itertools.count(2)),
            )
            first = list(itertools.islice(candidates, OWN_NAMES_LOOKED_AT))
            owned = [] if row else [name for name in first if own(name)]
            for name in itertools.chain(owned, first, candidates):
                folded = _fold(name)
                if folded == lost:
                    continue
                taken = "SELECT 1 FROM names WHERE folded = ? UNION ALL SELECT 1 FROM retired WHERE folded = ?"
                if db.execute(taken, (folded, folded)).fetchone() or exists(name):
                    continue
                db.execute("INSERT INTO names (relpath, name, folded) VALUES (?, ?, ?)", (key, name, folded))
                return name
        raise AssertionError("unreachable: the candidate names are endless")

    # -- state changes --------------------------------------------------------

    # The file stamp is size, mtime_ns, ino and ctime_ns of one stat of the source (see `service.unchanged`);
    # ino and ctime_ns not given are recorded as unknown: the next look at the file checks its content.

    def start(
        self,
        relpath: str,
        *,
        size: int,
        mtime_ns: int,
        sha256: str | None,
        rule: str,
        fingerprint: str,
        ino: int | None = None,
        ctime_ns: int | None = None,
        born: int | None = None,
    ) -> int:
        """Processing begins: one more attempt, counted afresh for a new file or for content that had reached a
        final state; returns which attempt this is. An inode or ctime the row does not know (a ledger from before
        them) tells no new file."""
        with self._transaction() as db:
            row = db.execute(
                """INSERT INTO sources (relpath, state, size, mtime_ns, ino, ctime_ns, sha256, rule, fingerprint,
                                    attempts, updated, born)
               VALUES (?, 'processing', ?, ?, ?, ?, ?, ?, ?, 1, ?, ?)
               ON CONFLICT (relpath) DO UPDATE SET
                   attempts = CASE
                       WHEN state IN ('published', 'rejected') THEN 1
                       WHEN size IS NOT excluded.size OR mtime_ns IS NOT excluded.mtime_ns
                            OR (ino IS NOT NULL AND ino IS NOT excluded.ino)
                            OR (ctime_ns IS NOT NULL AND ctime_ns IS NOT excluded.ctime_ns) THEN 1
                       ELSE attempts + 1
                   END,
                   reason = CASE WHEN state IN ('published', 'rejected') THEN NULL ELSE reason END,
                   message = CASE WHEN state IN ('published', 'rejected') THEN NULL ELSE message END,
                   state = 'processing', size = excluded.size, mtime_ns = excluded.mtime_ns,
                   ino = excluded.ino, ctime_ns = excluded.ctime_ns,
                   sha256 = excluded.sha256, rule = excluded.rule, fingerprint = excluded.fingerprint,
                   next_attempt = NULL, updated = excluded.updated, born = excluded.born
               RETURNING attempts""",
                (*self._source_values(relpath, size, mtime_ns, ino, ctime_ns, sha256, rule, fingerprint), born),
            ).fetchone()
        return int(row[0])

    def published(
        self,
        relpath: str,
        *,
        size: int,
        mtime_ns: int,
        sha256: str,
        rule: str,
        fingerprint: str,
        ino: int | None = None,
        ctime_ns: int | None = None,
        frame_sha256: str | None = None,
    ) -> None:
        """The source's outputs are in place; `frame_sha256` is the frame's hash when it was written just now
        (None: the frame on disk is still the one recorded before, as for unchanged content). The source is no
        longer gone (see `mark_gone`), unless it left its path again after this attempt started."""
        self._write(
            """INSERT INTO sources (relpath, state, size, mtime_ns, ino, ctime_ns, sha256, rule, fingerprint,
                                    attempts, updated, frame_sha256)
               VALUES (?, 'published', ?, ?, ?, ?, ?, ?, ?, 1, ?, ?)
               ON CONFLICT (relpath) DO UPDATE SET
                   state = 'published', size = excluded.size, mtime_ns = excluded.mtime_ns,
                   ino = excluded.ino, ctime_ns = excluded.ctime_ns,
                   sha256 = excluded.sha256, rule = excluded.rule, fingerprint = excluded.fingerprint,
                   frame_sha256 = COALESCE(excluded.frame_sha256, frame_sha256),
                   gone = CASE WHEN gone >= updated THEN gone END,
                   next_attempt = NULL, reason = NULL, message = NULL, updated = excluded.updated""",
            (
                *self._source_values(relpath, size, mtime_ns, ino, ctime_ns, sha256, rule, fingerprint),
                db_text(frame_sha256),
            ),
        )

    def _source_values(
        self,
        relpath: str,
        size: int | None,
        mtime_ns: int | None,
        ino: int | None,
        ctime_ns: int | None,
        sha256: str | None,
        *texts: str,
    ) -> tuple[object, ...]:
        """The values of a ``sources`` row: key, file stamp, hash, the statement's two text columns (rule and
        fingerprint, or reason and message), then `updated` (now)."""
        return (db_key(relpath), size, mtime_ns, ino, ctime_ns, db_text(sha256), *map(db_text, texts), self.clock())

    def rejected(
        self,
        relpath: str,
        *,
        reason: str,
        message: str,
        size: int | None = None,
        mtime_ns: int | None = None,
        sha256: str | None = None,
        ino: int | None = None,
        ctime_ns: int | None = None,
    ) -> None:
        """A final failure; stamp fields and hash not given keep what `start` recorded."""
        self._write(
            """INSERT INTO sources (relpath, state, size, mtime_ns, ino, ctime_ns, sha256, reason, message,
                                    attempts, updated)
               VALUES (?, 'rejected', ?, ?, ?, ?, ?, ?, ?, 1, ?)
               ON CONFLICT (relpath) DO UPDATE SET
                   state = 'rejected', size = COALESCE(excluded.size, size),
                   mtime_ns = COALESCE(excluded.mtime_ns, mtime_ns), ino = COALESCE(excluded.ino, ino),
                   ctime_ns = COALESCE(excluded.ctime_ns, ctime_ns), sha256 = COALESCE(excluded.sha256, sha256),
                   reason = excluded.reason, message = excluded.message, next_attempt = NULL,
                   updated = excluded.updated""",
            self._source_values(relpath, size, mtime_ns, ino, ctime_ns, sha256, reason, message),
        )

    def retry(self, relpath: str, *, reason: str, message: str, next_attempt: float) -> None:
        """A transient failure: try again at `next_attempt` (same clock as `due`); attempts are kept."""
        self._write(
            """INSERT INTO sources (relpath, state, reason, message, next_attempt, attempts, updated)
               VALUES (?, 'retry', ?, ?, ?, 1, ?)
               ON CONFLICT (relpath) DO UPDATE SET
                   state = 'retry', reason = excluded.reason, message = excluded.message,
                   next_attempt = excluded.next_attempt, updated = excluded.updated""",
            (db_key(relpath), db_text(reason), db_text(message), next_attempt, self.clock()),
        )

    def worker_died(self, relpath: str, *, counted: bool, message: str, next_attempt: float) -> None:
        """A worker died during the source's attempt, to be tried again from `next_attempt`; the attempt is
        `counted` only when the source ran alone (it may be what kills workers). No longer "processing", the
        row is not taken for one cut short by a stop before the retry (see `service.recovery`)."""
        self._write(
            """UPDATE sources SET state = 'retry', reason = 'crashed', message = ?, next_attempt = ?, updated = ?,
                   attempts = MAX(attempts - ?, 0)
               WHERE relpath = ? AND state = 'processing'""",
            (db_text(message), next_attempt, self.clock(), 0 if counted else 1, db_key(relpath)),
        )

    def mark_gone(self, relpaths: Sequence[str]) -> None:
        """The sources at `relpaths` were deleted or moved away (those without a row: nothing)."""
        now = self.clock()
        # The latest departure: one during an attempt must outlast that attempt's publication (see `published`).
        rows = [(now, db_key(relpath)) for relpath in relpaths]
        with self._transaction() as db:
            db.executemany("UPDATE sources SET gone = max(coalesce(gone, 0), ?) WHERE relpath = ?", rows)

    def forget(self, relpath: str) -> None:
        """Drop the source's entry (it vanished); its output name stays reserved for it."""
        self._write("DELETE FROM sources WHERE relpath = ?", (db_key(relpath),))

    def adopt(self, root: Path) -> int:
        """Give the rows keyed by an absolute path inside `root` the key a daemon watching `root` uses
        (the path relative to it); returns how many keys were adopted.

        `sinkwatch process` keys a file outside its own watch folder by its absolute path: a daemon
        watching that file's folder would take it for a new file and publish it again under a second
        name. Where the daemon's key has a row already, that row wins. An output name goes with the row
        whose outputs carry it; a name dropped here stays protected by its frame's sidecar.
        """
        prefix = os.path.join(os.path.realpath(root), "")
        low = db_key(prefix)
        high = low + b"\xff"  # 0xFF is in no UTF-8 text: it bounds every key that starts with `low`
        with self._transaction() as db:
            inside = "relpath >= ? AND relpath < ?"
            found = db.execute(
                f"SELECT relpath FROM sources WHERE {inside} UNION SELECT relpath FROM names WHERE {inside}",
                (low, high, low, high),
            ).fetchall()
            keys = {bytes(key): db_key(Path(db_relpath(key)).relative_to(prefix).as_posix()) for (key,) in found}
            for key, relative in keys.items():
                _adopt(db, key, relative)
            for name, key in db.execute(f"SELECT name, relpath FROM uploads WHERE {inside}", (low, high)).fetchall():
                db.execute("UPDATE uploads SET relpath = ? WHERE name = ?", (keys.get(bytes(key), key), name))
        return len(keys)

    # -- plumbing -------------------------------------------------------------

    def _write(self, statement: str, params: tuple[object, ...]) -> None:
        with self._transaction() as db:
            db.execute(statement, params)

    @contextmanager
    def _transaction(self, *, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction; IMMEDIATE for writers so that a read-then-write cannot interleave."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    with suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as exc:
                # Disk full, I/O error, read-only or locked state folder: worth trying again later.
                raise PublishError(f"ledger: {exc}", path=self.path, stage="ledger") from exc
            except sqlite3.DatabaseError as exc:
                if type(exc) is not sqlite3.DatabaseError:
                    raise  # integrity and programming errors are bugs, not conditions
                raise ConfigError(f"the ledger is damaged: {exc}", path=self.path) from exc


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
    except BaseException:
        db.close()
        raise
    return db


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _adopt(db: sqlite3.Connection, key: bytes, relative: bytes) -> None:
    """Move the ``sources`` and ``names`` rows of `key` to `relative` (see `Ledger.adopt`)."""

    def has(table: str, which: bytes) -> bool:
        return db.execute(f"SELECT 1 FROM {table} WHERE relpath = ?", (which,)).fetchone() is not None

    row, row_there = has("sources", key), has("sources", relative)
    name, name_there = has("names", key), has("names", relative)
    if row and not row_there:
        db.execute("UPDATE sources SET relpath = ? WHERE relpath = ?", (relative, key))
    db.execute("DELETE FROM sources WHERE relpath = ?", (key,))
    if name and (not name_there or (row and not row_there)):
        db.execute("DELETE FROM names WHERE relpath = ?", (relative,))
        db.execute("UPDATE names SET relpath = ? WHERE relpath = ?", (relative, key))
    db.execute("DELETE FROM names WHERE relpath = ?", (key,))


def _fold(name: str) -> str:
    """Names equal on a case-insensitive file system (Windows, macOS) fold to the same text."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", name).casefold())


def _entry(row: tuple[Any, ...]) -> Entry:
    relpath, *rest = row
    return Entry(db_relpath(relpath), *rest)
