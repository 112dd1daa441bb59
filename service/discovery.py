"""Finding work: watch events, settled files and folder scans become engine candidates.

The watcher thread only enqueues; this runs on the daemon's main thread and
offers what it finds to the engine. A scan is a lazy walk fed only while the
engine has room, so a huge backlog costs no memory.
"""

from __future__ import annotations

import itertools
import os
import queue
import time
from collections.abc import Callable, Iterator, Set
from pathlib import Path

from loguru import logger

from service.engine import Candidate, Engine
from service.errors import SinkwatchError
from service.selection import Selection
from service.stability import StabilityTracker
from service.watcher import EventQueue

# A scan records what it finds in the ledger at most this often (wall seconds), and at start and after the watch
# was lost: enough to tell a source gone for --forget-after-days, and the sources that left their paths while no
# event told (see `Ledger.mark_gone`), at the cost of one write per chunk of a scan a day.
MARK_EVERY = 86400.0
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
        forget_after: float = 0.0,
        wall: Callable[[], float] = time.time,
    ) -> None:
        """`forget_after`: seconds a source may be gone from the watch folder before its row is deleted (0: never)."""
        self.selection = selection
        self.events = events
        self.tracker = tracker
        self.engine = engine
        self.clock = clock
        self.scan: Iterator[tuple[str, str]] | None = None
        # Scanned and judged (key, path) pairs the full engine had no room for yet, at most one turn's worth.
        self.held: list[tuple[str, str]] = []
        # Taken from the scan at a turn whose ledger could not judge them: the next turn takes them first.
        self.unjudged: list[tuple[str, str]] = []
        self.scan_source = "startup"
        self.rescan_requested = False
        self.last_scan_done = clock()
        self.forget_after = forget_after
        self.wall = wall
        self.marking = False  # this scan records what it finds (see MARK_EVERY)
        self.rescan_marks = False  # the scan asked for behind the running one is to mark
        self.marked_at: float | None = None  # wall time of the last scan that did
        self.scan_wall = 0.0  # wall time the running scan started
        self.scanned = 0  # files the running scan has found so far

    @property
    def scanning(self) -> bool:
        return self.scan is not None

    def take_events(self) -> None:
        self.events.rearm()
        wall = time.time()
        gone: list[str] = []
        for _ in range(EVENTS_PER_TURN):
            try:
                kind, path = self.events.get_nowait()
            except queue.Empty:
                break
            if kind in ("rescan", "rescan-gone"):
                self.start_scan("scan", mark=kind == "rescan-gone")
                continue
            key = self.selection.relpath(path)
            if key is None:
                continue
            if kind == "deleted":
                # Even if a file is there again by now: that one is the new image. (A poll that finds another
                # inode at a path reports it deleted too: with --polling, an edit saved by a rename is one.)
                gone.append(key)
            elif kind == "closed":
                self.tracker.forget(path)
                if not self.engine.offer(Candidate(key, path, "event", wall)):
                    self.events.overflowed = True
            else:
                self.tracker.observe(path)
        if gone:
            self.engine.ledger.mark_gone(gone)
        for path, held in self.tracker.ready():
            key = self.selection.relpath(path)
            # The latency runs from the file's last change, so that it takes in the settle delay.
            if key is not None and not self.engine.offer(Candidate(key, path, "event", wall - held)):
                self.events.overflowed = True

    def start_scan(self, source: str, *, mark: bool = False) -> None:
        """Walk the watch folder; `mark`: record what it finds, and so which sources are gone (see MARK_EVERY)."""
        if self.scan is None:
            self.scan = self.selection.scan_keys()
            self.scan_source = source
            self.scan_wall, self.scanned = self.wall(), 0
            self.marking = mark or self.marked_at is None or self.scan_wall - self.marked_at >= MARK_EVERY
        else:
            # Events may have been dropped behind the running scan's position: scan again after it.
            self.rescan_requested = True
            self.rescan_marks = self.rescan_marks or mark

    def feed_scan(self) -> None:
        """Move scanned files into the engine while it has room: backpressure, not memory.

        A turn asks the engine about all the files it takes from the scan at once (one ledger query), and
        builds a candidate only for a file that may be work: at every rescan most of a folder is processed
        and unchanged. What finds no room is held, and offered first once there is room: `Engine.offer`
        judges each again then, as it is by that time. Judging the held files together at every turn
        instead cost half the main thread's time through a backlog, where room comes one file at a time.
        """
        if self.scan is None or not self.engine.has_room():
            return
        if self.held:
            self.held = self._offer(self.held, settled=frozenset(), wall=time.time())
            if self.held:
                return
        found = self.unjudged or list(itertools.islice(self.scan, SCAN_FILES_PER_TURN))
        self.unjudged = []
        self.scanned += len(found)
        try:
            if self.marking and found:
                self.engine.ledger.mark_seen([key for key, _path in found], self.scan_wall)
            settled = self.engine.settled(found, source=self.scan_source)
            if self.marking and (unchanged := settled - self.engine.pending.keys()):
                # Found as recorded, they never left: a folder mounted only after the daemon's first scan.
                self.engine.ledger.mark_present(sorted(unchanged))
        except SinkwatchError:
            # The ledger cannot answer now (its disk): the daemon pauses, and they are taken again at its next turn.
            self.unjudged = found
            raise
        self.held = self._offer(found, settled=settled, wall=time.time())
        if self.held or len(found) == SCAN_FILES_PER_TURN:
            return
        if self.marking:
            self._settle_gone()  # while the ledger cannot write, the scan stays open and ends at a later turn
        self.scan = None
        self.last_scan_done = self.clock()
        if self.rescan_requested:
            mark, self.rescan_requested, self.rescan_marks = self.rescan_marks, False, False
            self.start_scan("scan", mark=mark)

    def _offer(self, found: list[tuple[str, str]], *, settled: Set[str], wall: float) -> list[tuple[str, str]]:
        """Offer the scanned files that may be work until the engine is full; returns those it had no room for."""
        position = 0
        try:
            for position, (key, path) in enumerate(found):
                if not self.engine.has_room():
                    return found[position:]
                if key in settled or self.tracker.holds(Path(path)):
                    continue  # a file an event told of waits for the event: it may explain a new inode
                # The listing may be old by now: judge the file as it is, as for an event.
                source = Path(path)
                checked = self.selection.relpath(source)
                if checked is not None:
                    self.engine.offer(Candidate(checked, source, self.scan_source, wall))
        except SinkwatchError:
            self.held = found[position:]  # the ledger cannot answer now (its disk): the daemon pauses, they wait
            raise
        return []

    def _settle_gone(self) -> None:
        """After a scan that marked what it found: the sources it did not find are gone (events can be lost, and
        none come while the daemon is stopped); drop the rows of those gone for `forget_after`."""
        root = self.selection.root
        unlisted = self.selection.unlisted
        if "" in unlisted or (not self.scanned and not (os.path.isdir(root) and os.access(root, os.R_OK | os.X_OK))):
            return  # no folder to list, or none readable: this says nothing of what left it
        # An empty folder does: its images were cleared (a mount not up yet looks the same, and costs only that
        # each source's next edit goes to a new name, as another image would).
        self.engine.ledger.mark_unseen_gone(self.scan_wall, spared=unlisted)
        self.marked_at = self.scan_wall
        if self.forget_after <= 0 or not self.scanned:
            return  # nor does it tell that they are gone for good
        forgotten = self.engine.ledger.forget_gone(self.scan_wall - self.forget_after)
        if forgotten:
            logger.info(
                "forgot {} sources gone from the watch folder for over {:g} days", forgotten, self.forget_after / 86400
            )
