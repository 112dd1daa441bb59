"""Finding work: watch events, settled files and folder scans become engine candidates.

The watcher thread only enqueues; this runs on the daemon's main thread and
offers what it finds to the engine. A scan is a lazy walk fed only while the
engine has room, so a huge backlog costs no memory.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from service.engine import Candidate, Engine
from service.selection import Selection
from service.stability import StabilityTracker
from service.watcher import EventQueue

EVENTS_PER_TURN = 4096  # so that an event storm cannot starve the rest of the loop
# Files a scan looks at per loop turn: a folder of processed files is walked over many turns, not in one.
SCAN_FILES_PER_TURN = 256


class Discovery:
    def __init__(
        self,
        *,
        selection: Selection,
        events: EventQueue,
        tracker: StabilityTracker,
        engine: Engine,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.selection = selection
        self.events = events
        self.tracker = tracker
        self.engine = engine
        self.clock = clock
        self.scan: Iterator[Path] | None = None
        self.scan_source = "startup"
        self.rescan_requested = False
        self.last_scan_done = clock()

    @property
    def scanning(self) -> bool:
        return self.scan is not None

    def take_events(self) -> None:
        self.events.rearm()
        wall = time.time()
        for _ in range(EVENTS_PER_TURN):
            try:
                kind, path = self.events.get_nowait()
            except queue.Empty:
                break
            if kind == "rescan":
                self.start_scan("scan")
                continue
            key = self.selection.relpath(path)
            if key is None:
                continue
            if kind == "closed":
                self.tracker.forget(path)
                if not self.engine.offer(Candidate(key, path, "event", wall)):
                    self.events.overflowed = True
            else:
                self.tracker.observe(path)
        for path in self.tracker.ready():
            key = self.selection.relpath(path)
            if key is not None and not self.engine.offer(Candidate(key, path, "event", wall)):
                self.events.overflowed = True

    def start_scan(self, source: str) -> None:
        if self.scan is None:
            self.scan = self.selection.scan()
            self.scan_source = source
        else:
            # Events may have been dropped behind the running scan's position: scan again after it.
            self.rescan_requested = True

    def feed_scan(self) -> None:
        """Move scanned files into the engine while it has room: backpressure, not memory."""
        if self.scan is None:
            return
        wall = time.time()
        for _ in range(SCAN_FILES_PER_TURN):
            if not self.engine.has_room():
                return
            path = next(self.scan, None)
            if path is None:
                self.scan = None
                self.last_scan_done = self.clock()
                if self.rescan_requested:
                    self.rescan_requested = False
                    self.start_scan("scan")
                return
            key = self.selection.relpath(path)
            if key is not None:
                self.engine.offer(Candidate(key, path, self.scan_source, wall))
