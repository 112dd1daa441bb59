"""A sinkwatch upgraded on disk under a running daemon.

Workers are spawned: one started after ``pip install`` (a burst that needs a
second worker, a crashed worker replaced) loads the new code, while the
daemon's main process runs the old. Their calls need not agree: a changed
signature killed every new worker at its start, and the images in flight were
rejected as crashes, for good. So the daemon watches the modules it runs, and
once they changed on disk it stops on its own with exit 75: the systemd unit
(or any supervisor) starts it again, on the new code.
"""

from __future__ import annotations

from pathlib import Path

import core
import service

# Seconds between two looks at the modules (a stat each, about a hundred).
CHECK_EVERY = 2.0
PACKAGES = (Path(core.__file__).parent, Path(service.__file__).parent)

Stamp = frozenset[tuple[str, int, int, int]]


def code_stamp(packages: tuple[Path, ...]) -> Stamp:
    """Inode, mtime and size of every module of the packages (a module missing mid-install is left out)."""
    stamp = set()
    for package in packages:
        for path in package.glob("*.py"):
            try:
                st = path.stat()
            except OSError:
                continue
            stamp.add((str(path), st.st_ino, st.st_mtime_ns, st.st_size))
    return frozenset(stamp)


class CodeWatch:
    def __init__(self, packages: tuple[Path, ...] = PACKAGES) -> None:
        self.packages = packages
        self.started = code_stamp(packages)
        self.next_check = 0.0

    def changed(self, now: float) -> bool:
        """Whether the modules on disk are no longer those this process started with (looked at every few s)."""
        if now < self.next_check:
            return False
        self.next_check = now + CHECK_EVERY
        return code_stamp(self.packages) != self.started
