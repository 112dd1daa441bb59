"""The ledger's SQLite schema, how a ledger file reaches it, and how values are stored in it.

A ledger file carries its schema version in ``PRAGMA user_version``. Opening
it applies the missing migrations, and a file from a newer sinkwatch is
refused rather than guessed at.

Source keys are stored as UTF-8 bytes (BLOB) so that file names that are not
valid UTF-8 (lone surrogates after Python's decoding) round-trip exactly.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from service.errors import ConfigError

SCHEMA_VERSION = 9
# Statements that bring a ledger from version N-1 to N; a new version appends an entry.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE sources (
            relpath BLOB PRIMARY KEY,
            state TEXT NOT NULL CHECK (state IN ('processing', 'published', 'rejected', 'retry')),
            size INTEGER,
            mtime_ns INTEGER,
            sha256 TEXT,
            rule TEXT,
            fingerprint TEXT,
            attempts INTEGER NOT NULL CHECK (attempts >= 0),
            next_attempt REAL,
            reason TEXT,
            message TEXT,
            updated REAL NOT NULL
        )""",
        "CREATE INDEX sources_by_state ON sources (state, next_attempt)",
        """CREATE TABLE names (
            relpath BLOB PRIMARY KEY,
            name TEXT NOT NULL,
            folded TEXT NOT NULL UNIQUE
        )""",
    ),
    2: (
        """CREATE TABLE uploads (
            name TEXT PRIMARY KEY,
            relpath BLOB NOT NULL,
            width INTEGER NOT NULL CHECK (width > 0),
            height INTEGER NOT NULL CHECK (height > 0),
            state TEXT NOT NULL CHECK (state IN ('pending', 'done', 'failed')),
            generation INTEGER NOT NULL CHECK (generation >= 1),
            reference TEXT,
            prompt_id TEXT,
            reason TEXT,
            message TEXT,
            queued REAL NOT NULL,
            updated REAL NOT NULL
        )""",
        "CREATE INDEX uploads_by_state ON uploads (state, queued)",
    ),
    # Size and mtime alone miss new content copied in with its mtime kept (rsync -t, cp -p). Rows from
    # before have NULL here, which the scans read as "unknown": the content is hashed once and compared.
    3: (
        "ALTER TABLE sources ADD COLUMN ino INTEGER",
        "ALTER TABLE sources ADD COLUMN ctime_ns INTEGER",
    ),
    # The hash of the frame last published for a source: a frame of its name with other content was
    # put there by someone else, and is never replaced. NULL before: the sidecar's record is asked instead.
    4: ("ALTER TABLE sources ADD COLUMN frame_sha256 TEXT",),
    # When a scan last found the source in the watch folder (wall time): a row whose source has been gone for
    # --forget-after-days is deleted, so the ledger does not grow for ever. NULL: not seen by a scan yet.
    5: ("ALTER TABLE sources ADD COLUMN seen REAL",),
    # When the source was found deleted or moved away (wall time), until its path is published again: a file
    # that then appears at the path is another image (ComfyUI counts its names up again from the highest left),
    # and the frame of the one before is kept. Names a source lost are retired, never handed out again.
    6: (
        "ALTER TABLE sources ADD COLUMN gone REAL",
        """CREATE TABLE retired (
            folded TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            relpath BLOB NOT NULL,
            retired REAL NOT NULL
        )""",
    ),
    # The birth time of the file last started: it tells another file at the path where no event did (see
    # service.birth).
    7: ("ALTER TABLE sources ADD COLUMN born INTEGER",),
    # The daemon run that last started: the boot it ran in, and when its stop began. Images a run left in
    # flight count a kill against themselves only if it came in the same boot and not during a stop.
    8: (
        """CREATE TABLE runs (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            boot_id TEXT,
            stopping REAL
        )""",
    ),
    # The video job a queued workflow became in ComfyUI: 'waiting' until a look finds it in ComfyUI's history
    # ('success', 'error', 'interrupted') or in neither its queue nor its history ('lost'; 'unknown' when the
    # daemon then running had not seen it in the queue). NULL: no job (no workflow, or queued before this).
    # requeued: how often the frame's lost jobs were queued again (--comfyui-requeue-lost), until it is republished.
    9: (
        "ALTER TABLE uploads ADD COLUMN job TEXT",
        "ALTER TABLE uploads ADD COLUMN requeued INTEGER NOT NULL DEFAULT 0 CHECK (requeued >= 0)",
        "CREATE INDEX uploads_by_job ON uploads (job, updated)",
    ),
}


def migrate(db: sqlite3.Connection, *, path: Path) -> None:
    """Bring the ledger at `path` to SCHEMA_VERSION, within the caller's transaction."""
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise ConfigError(
            f"the ledger has schema version {version}, newer than this sinkwatch ({SCHEMA_VERSION})",
            path=path,
        )
    for target in range(version + 1, SCHEMA_VERSION + 1):
        for statement in MIGRATIONS[target]:
            db.execute(statement)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def db_key(relpath: str) -> bytes:
    return relpath.encode("utf-8", "surrogatepass")


def db_relpath(key: bytes) -> str:
    return bytes(key).decode("utf-8", "surrogatepass")


def db_text(value: str | None) -> str | None:
    """Text SQLite can store: lone surrogates (from undecodable file names) escaped."""
    return None if value is None else value.encode("utf-8", "backslashreplace").decode("utf-8")
