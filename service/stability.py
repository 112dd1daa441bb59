"""Hand a file on only once it has stopped changing (after paperless-ngx's FileStabilityTracker).

``created`` and ``moved`` events arrive before a writer is done; a file whose
size and modification time have held for `settle` seconds, and which is still
a regular file, is taken as finished. Time comes from an injected clock.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class _Candidate:
    signature: tuple[int, int]  # (size, mtime_ns)
    changed_at: float


class StabilityTracker:
    def __init__(self, *, settle: float, clock: Callable[[], float] = time.monotonic) -> None:
        if settle < 0:
            raise ValueError(f"settle must be >= 0 seconds, got {settle}")
        self.settle = settle
        self.clock = clock
        self._candidates: dict[Path, _Candidate] = {}

    def observe(self, path: Path) -> None:
        """Start or refresh tracking `path`; a change restarts its settle time."""
        signature = _signature(path)
        if signature is None:
            self._candidates.pop(path, None)
            return
        known = self._candidates.get(path)
        if known is None or known.signature != signature:
            self._candidates[path] = _Candidate(signature, self.clock())

    def ready(self) -> list[tuple[Path, float]]:
        """Paths that have held still for `settle` seconds, each with how long it has (at least `settle`).

        Each is returned once and then forgotten. The time held still reaches back to the file's last
        change, that is to its close, which is where the publish latency starts.
        """
        now = self.clock()
        settled: list[tuple[Path, float]] = []
        for path, known in list(self._candidates.items()):
            # Only files due are checked again, so a large burst costs no stat calls per tick.
            held = now - known.changed_at
            if held < self.settle:
                continue
            signature = _signature(path)
            if signature is None:
                del self._candidates[path]
            elif signature != known.signature:
                self._candidates[path] = _Candidate(signature, now)
            else:
                del self._candidates[path]
                settled.append((path, held))
        return settled

    def forget(self, path: Path) -> None:
        self._candidates.pop(path, None)

    def holds(self, path: Path) -> bool:
        """Whether `path` waits to hold still (an event told of it)."""
        return path in self._candidates

    def pending(self) -> int:
        return len(self._candidates)


def _signature(path: Path) -> tuple[int, int] | None:
    """(size, mtime_ns) of a regular file; None when it is gone or not a regular file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return st.st_size, st.st_mtime_ns
