"""Start-up checks of the three folders, so a bad layout fails fast with a clear message.

A layout that can never work is a :class:`ConfigError`; a queue or state folder that cannot be
written *yet* (disk full, read-only or not mounted at boot, permissions being fixed) is a
transient :class:`PublishError`, which the command line turns into exit 75 so that a supervisor
starts sinkwatch again.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from loguru import logger

from service.errors import ConfigError, PublishError

# Conditions of the disk, not of the settings: they may pass while the settings stay as they are.
PASSING_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES})


@dataclass(frozen=True)
class Folders:
    watch: Path
    queue: Path
    state: Path


def prepare_folders(
    watch: Path, queue: Path, state: Path | None, *, if_watch_missing: Literal["create", "wait", "refuse"]
) -> Folders:
    """Resolve, create what may be created, and refuse layouts that would lose or eat images.

    A missing watch folder is created only for the embedded default (so that a start with no
    configuration works): creating one that was named would hide a typo behind a daemon watching an
    empty folder forever. "wait" leaves it missing for the caller; "refuse" stops before any folder
    is made.
    """
    watch, queue = check_layout(watch, queue, state)
    found = _look_up(watch)
    if found is None:
        if if_watch_missing == "refuse":
            raise ConfigError("the watch folder does not exist (check --watch)", path=watch)
        if if_watch_missing == "create":
            _make(watch, "watch")
            logger.info("created the watch folder {}", watch)
            found = _look_up(watch)
    if found is not None:
        if not stat.S_ISDIR(found.st_mode):
            raise ConfigError("the watch folder is not a folder", path=watch)
        if not os.access(watch, os.R_OK | os.X_OK):
            raise ConfigError("the watch folder cannot be read (permissions)", path=watch)
    queue, state = prepare_queue(queue, state)
    return Folders(watch=watch, queue=queue, state=state)


def check_layout(watch: Path, queue: Path, state: Path | None) -> tuple[Path, Path]:
    """The watch and queue folders resolved; a ConfigError for a layout that would eat its own output or
    write into the watch folder (`run` and `process` refuse the same layouts)."""
    watch = watch.expanduser().resolve()
    queue = queue.expanduser().resolve()
    if queue == watch or queue.is_relative_to(watch):
        raise ConfigError(
            f"the queue folder {queue} is the watch folder or inside it: sinkwatch would process its own output"
        )
    if watch.is_relative_to(queue):
        raise ConfigError(f"the watch folder {watch} is inside the queue folder {queue}: keep them apart")
    if state is not None and state.expanduser().resolve().is_relative_to(watch):
        # The source folder is never written to, and the ledger would watch itself.
        raise ConfigError(f"the state folder {state} is the watch folder or inside it: keep them apart")
    return watch, queue


def folder_problem(path: Path) -> str | None:
    """None if `path` is a folder now; else what keeps it from being watched for now: it does not exist, or is
    out of reach (a parent folder made private, a network mount not answering)."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "does not exist"
    except OSError as exc:
        return f"cannot be reached ({exc.strerror})"
    return None if stat.S_ISDIR(mode) else "is not a folder"


def _look_up(watch: Path) -> os.stat_result | None:
    """The watch folder's stat; None while it is missing (or a network mount does not answer)."""
    try:
        return os.stat(watch)
    except PermissionError as exc:
        raise ConfigError(
            f"cannot reach the watch folder: {exc.strerror} (a folder above it is closed to this user; "
            "under systemd, ProtectHome= hides /home)",
            path=watch,
        ) from exc
    except OSError:
        return None


def prepare_queue(queue: Path, state: Path | None) -> tuple[Path, Path]:
    """The queue and state folders, created and proven writable."""
    queue = queue.expanduser().resolve()
    state = (state.expanduser() if state is not None else queue / ".sinkwatch" / "state").resolve()
    for folder, role in ((queue, "queue"), (state, "state")):
        _make(folder, role)
        _probe_writable(folder, role)
    return queue, state


def _make(folder: Path, role: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _folder_error(f"cannot create the {role} folder", folder, exc) from exc


def _probe_writable(folder: Path, role: str) -> None:
    # os.access lies for root and on some network mounts; a real write does not.
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".sinkwatch-probe-"):
            pass
    except OSError as exc:
        raise _folder_error(f"the {role} folder is not writable", folder, exc) from exc


def _folder_error(what: str, folder: Path, exc: OSError) -> ConfigError | PublishError:
    message = f"{what}: {exc.strerror}"
    if exc.errno in PASSING_ERRNOS:
        return PublishError(message, path=folder, stage="start")
    return ConfigError(message, path=folder)
