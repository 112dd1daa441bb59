"""The inotify watch limit in recursive mode: found, said, and recovered from.

watchdog watches each subfolder with a watch of its own and skips, without a
word, any subfolder it cannot watch: only a failure on the watch folder itself
reaches the daemon. With the user's watch table full (``fs.inotify.max_user_watches``),
images in the skipped subfolders wait for the reconciliation scan, and the
subfolders stay unwatched even after the limit is raised. So after each scan
the table is probed directly (one watch, added and dropped on an inotify
instance of our own); a full one is logged once, and once there is room again
the watcher is restarted so that it watches every subfolder.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from pathlib import Path

from loguru import logger

from service.errors import ConfigError
from service.watcher import FolderWatcher

_IN_CREATE = 0x100
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


class WatchLimit:
    def __init__(self, watcher: FolderWatcher, *, rescan_interval: float) -> None:
        self.watcher = watcher
        self.rescan_interval = rescan_interval
        self.reached = False

    @property
    def applies(self) -> bool:
        return self.watcher.recursive and not self.watcher.polling and _libc is not None

    def check(self) -> bool:
        """Probe the watch table (after a scan); True when the watcher was restarted to watch everything again."""
        if not self.applies:
            return False
        full = inotify_full(self.watcher.root)
        if full == self.reached:
            return False
        self.reached = full
        if full:
            logger.warning(
                "the inotify watch limit is reached: new subfolders of {} are not watched, their images are "
                "found by the reconciliation scan only (every {:.0f}s). Raise the sysctl "
                "fs.inotify.max_user_watches (e.g. `sysctl fs.inotify.max_user_watches=524288`) or run with --polling",
                self.watcher.root,
                self.rescan_interval,
            )
            return False
        logger.info("the inotify watch limit has room again; restarting the watcher to watch every subfolder")
        try:
            self.watcher.restart()
        except ConfigError:
            return False  # the watcher is down now: the daemon's watcher check restarts it and logs why
        return True


def inotify_full(folder: Path) -> bool:
    """Whether this user's inotify watch table has no room left (ENOSPC on a new watch of `folder`)."""
    if _libc is None:
        return False
    fd = _libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        return False  # no instance left to probe with; the watcher's own instance is made already
    try:
        added = _libc.inotify_add_watch(fd, os.fsencode(folder), _IN_CREATE)
        return bool(added < 0 and ctypes.get_errno() == errno.ENOSPC)
    finally:
        os.close(fd)
