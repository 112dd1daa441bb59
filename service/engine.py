"""The work engine shared by the daemon and `sinkwatch process`.

It owns the pending set (deduplicated, bounded), the ledger checks that make
processing idempotent, dispatch to the worker pool with a bounded number in
flight, and hands every finished job to `service.outcomes`, the one place where
outcomes become ledger rows, reject records, metrics and log lines. It is
driven from a single thread by `pump()`.
"""

from __future__ import annotations

import os
import stat
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from service import ownership, recovery, unchanged
from service.birth import birth_ns
from service.errors import SinkwatchError
from service.ledger import FINAL_STATES, Entry, Ledger, Stamp
from service.made_from_frame import LOCAL, FrameRefs
from service.metrics import Metrics
from service.naming import safe_stem
from service.outcomes import OnPublished, Outcomes
from service.pool import WorkerPool
from service.publish import Publisher
from service.rules import Rule, RuleSet
from service.runner import Job, Outcome, Rejection


@dataclass(frozen=True)
class Candidate:
    key: str  # ledger key: path relative to the watch folder (daemon) or absolute (batch)
    path: Path
    source: str  # "event" | "scan" | "startup" | "retry" | "batch"
    seen_at: float  # wall clock when the file was known complete (latency start)
    label: str = ""  # what the output name is made from, when not the key

    @property
    def name_source(self) -> str:
        return self.label or self.key


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    max_pixels: int
    max_attempts: int
    retry_base: float
    queue_size: int


class Engine:
    def __init__(
        self,
        *,
        queue: Path,
        rules: RuleSet,
        ledger: Ledger,
        pool: WorkerPool,
        metrics: Metrics,
        limits: Limits,
        resolve: Callable[[str], Path],
        forced_rule: Rule | None = None,
        force: bool = False,
        clock: Callable[[], float] = time.time,
        wakeup: Callable[[], Future[None]] | None = None,
        events_tell_departures: bool = True,
        frame_refs: FrameRefs = LOCAL,
    ) -> None:
        self.queue = queue
        self.frame_refs = frame_refs
        self.rules = rules
        self.ledger = ledger
        self.pool = pool
        self.metrics = metrics
        self.limits = limits
        self.resolve = resolve
        self.forced_rule = forced_rule
        self.force = force
        self.clock = clock
        # A future that completes when there is new work to offer (the daemon's watch events): waits end early.
        self.wakeup = wakeup
        # inotify reports a deletion as such; a poll reports another file at a path, its inode or birth time
        # changed, as deleted and created alike, and an edit saved by a rename looks the same as another image.
        self.events_tell_departures = events_tell_departures
        self.publisher = Publisher(queue)
        self.outcomes = Outcomes(
            ledger=ledger,
            publisher=self.publisher,
            metrics=metrics,
            max_attempts=limits.max_attempts,
            retry_base=limits.retry_base,
            clock=clock,
        )
        self.pending: OrderedDict[str, Candidate] = OrderedDict()
        self.in_flight: dict[Future[Outcome], tuple[Candidate, Job]] = {}
        # In flight when a worker died, culprit or bystander: each runs alone until it finishes, so a crash names it.
        self.suspects: set[str] = set()
        # Offered again while running: the file may have changed after the worker read it.
        self.recheck: dict[str, Candidate] = {}
        # The rejection a job in flight when a worker died came with (`Job.rejected_as`): its retry's row no
        # longer says it, and the same bytes must still not be decoded again.
        self.rejected_before: dict[str, Rejection] = {}

    @property
    def counts(self) -> dict[str, int]:
        """Outcomes handled so far: published, rejected, retried, skipped."""
        return self.outcomes.counts

    @property
    def on_published(self) -> OnPublished | None:
        """Called after each publish (see `service.outcomes.OnPublished`)."""
        return self.outcomes.on_published

    @on_published.setter
    def on_published(self, callback: OnPublished | None) -> None:
        self.outcomes.on_published = callback

    # -- finding work ---------------------------------------------------------

    def offer(self, candidate: Candidate) -> bool:
        """Queue a candidate unless it is already queued, running or done; False when full."""
        if candidate.key in self.pending:
            self.pending[candidate.key] = _told_first(self.pending[candidate.key], candidate)
            return True
        if self._running(candidate.key):
            self.recheck[candidate.key] = _told_first(self.recheck.get(candidate.key), candidate)
            return True
        stamps = self.ledger.stamps([candidate.key])  # one ledger read for both questions below
        if not self.force and self._already_done(candidate, stamps):
            return True
        if len(self.pending) >= self.limits.queue_size:
            return False
        self.pending[candidate.key] = candidate
        # Found before and not settled yet (a slow writer's file between its tries, one waiting for a retry): found
        # again, it is no other image.
        known = stamps.get(candidate.key)
        if candidate.source in ("event", "scan", "startup") and (known is None or known.state in FINAL_STATES):
            self.metrics.discovered.labels(source=candidate.source).inc()
        return True

    def has_room(self) -> bool:
        return len(self.pending) < self.limits.queue_size

    def _running(self, key: str) -> bool:
        return any(job.key == key for _candidate, job in self.in_flight.values())

    def settled(self, found: Sequence[tuple[str, str]], *, source: str) -> set[str]:
        """The keys among scanned (key, path) pairs that `offer` would leave alone now: queued, or
        done and unchanged. One ledger query for all of them, where `offer` makes one per file."""
        queued = {key for key, _path in found if key in self.pending}
        if self.force:
            return queued
        running = {job.key for _candidate, job in self.in_flight.values()}
        rest = [(key, path) for key, path in found if key not in queued and key not in running]
        return queued | unchanged.done(self.ledger, rest, source=source)

    def _already_done(self, candidate: Candidate, stamps: Mapping[str, Stamp] | None = None) -> bool:
        found = [(candidate.key, candidate.path)]
        return bool(unchanged.done(self.ledger, found, source=candidate.source, stamps=stamps))

    def requeue_due(self, keys: Collection[str] | None = None) -> None:
        """Offer the sources whose retry is due; only those among `keys` when given (a batch's own files)."""
        now = self.clock()
        for entry in self.ledger.due(now, latest=now + self.outcomes.longest_delay):
            if keys is not None and entry.relpath not in keys:
                continue
            if not self.has_room():
                return
            if entry.reason == "crashed":  # a worker died under it: it runs alone, after a restart too
                self.suspects.add(entry.relpath)
            path = self.resolve(entry.relpath)
            if not _regular(path):
                # Deleted or replaced by a folder (or the like) while it waited: nothing is left to retry. `offer`
                # would call it done without settling the row, and `retrying` would then never turn False.
                self.ledger.forget(entry.relpath)
                continue
            self.offer(Candidate(entry.relpath, path, "retry", self.clock()))

    def recover(self, *, kills_count: bool) -> int:
        """After a crash: settle the rows a dead run left in "processing"; returns how many (see `service.recovery`).

        `kills_count`: the dead run was killed outright in this boot, not during its stop (see
        `service.ledger_runs`), so an image that ran alone may have been what killed it.
        """
        return recovery.recover(
            self.ledger,
            self.publisher,
            resolve=self.resolve,
            requeue=lambda entry, path, alone: self._cut_short(entry, path, alone=alone and kills_count),
            published=self.on_published,
        )

    def _cut_short(self, entry: Entry, path: Path, *, alone: bool) -> None:
        """`entry` was in flight when the whole run died: as for a worker death, it runs alone from now on,
        and a death while it already did (`alone`, and it was a suspect) counts."""
        candidate = Candidate(entry.relpath, path, "retry", self.clock())
        rule = self.forced_rule or self.rules.select(candidate.name_source)
        job = Job(
            source=path,
            key=entry.relpath,
            name=entry.output_name or self._output_name(candidate),
            rule=rule,
            queue=self.queue,
            max_bytes=self.limits.max_bytes,
            max_pixels=self.limits.max_pixels,
        )
        self._worker_died(candidate, job, alone=alone and entry.reason == "crashed", whole=True)

    # -- dispatch -------------------------------------------------------------

    def pump(self, *, timeout: float = 0.05) -> int:
        """Dispatch what fits, collect what finished; returns outcomes handled."""
        if not self.in_flight and not self.pool.alive():
            # A worker died with nothing in flight (the OOM killer, say): no future reports it.
            self._replace_pool()
        try:
            while self.pending and len(self.in_flight) < 2 * self.pool.workers:
                if self.in_flight and (next(iter(self.pending)) in self.suspects or self._suspect_running()):
                    break  # a suspect runs alone
                _key, candidate = self.pending.popitem(last=False)
                try:
                    self._dispatch(candidate)
                except BrokenProcessPool:
                    # A worker died since the last collect: the futures in flight report it and replace the pool.
                    self._put_back(candidate)
                    break
                except SinkwatchError:
                    # The ledger could not record the start (its disk is full): keep the work for later.
                    self._put_back(candidate)
                    raise
            return self._collect(timeout)
        finally:
            # Also while the ledger pauses the work: what waits is shown waiting.
            self.metrics.queue_depth.set(len(self.pending))
            self.metrics.in_flight.set(len(self.in_flight))

    def _put_back(self, candidate: Candidate) -> None:
        self.pending[candidate.key] = candidate
        self.pending.move_to_end(candidate.key, last=False)

    def _suspect_running(self) -> bool:
        return any(job.key in self.suspects for _candidate, job in self.in_flight.values())

    def publishing(self, name: str) -> bool:
        """Whether a worker is making (and may be publishing) output `name` right now."""
        return any(job.name == name for _candidate, job in self.in_flight.values())

    def idle(self) -> bool:
        return not self.pending and not self.in_flight

    def retrying(self, max_attempts: int, keys: Collection[str] | None = None) -> bool:
        """Whether any source (among `keys`, when given) still waits for a retry that may yet succeed."""
        return any(
            entry.attempts < max_attempts and (keys is None or entry.relpath in keys)
            for entry in self.ledger.entries("retry")
        )

    def _dispatch(self, candidate: Candidate) -> None:
        try:
            st = os.stat(candidate.path)
        except OSError:
            return
        entry = self.ledger.get(candidate.key)
        born = birth_ns(candidate.path)
        # No row: nothing tells that the file there is the image the source's frame was made from.
        gone = entry is None or entry.gone is not None
        told = candidate.source == "event" and self.events_tell_departures
        if entry is not None and not gone and not told and _another_file(entry, st, born):
            # Another file at the path, and no event told how it came (stopped, events lost, a poll): it may be
            # another image as well as an edit saved by a rename, and only the former's frame must not be replaced.
            self.ledger.mark_gone([candidate.key])
            gone = True
        rule = self.forced_rule or self.rules.select(candidate.name_source)
        name = self._output_name(candidate)
        known = entry.sha256 if entry and entry.state == "published" and not self.force else None
        made_by = (rule.name, rule.fingerprint)
        if known is not None and entry is not None and entry.rule and entry.fingerprint:
            # Unchanged content keeps its outputs (a skip): the ledger goes on naming the rule that made them.
            made_by = (entry.rule, entry.fingerprint)
        attempt = self.ledger.start(
            candidate.key,
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            ino=st.st_ino,
            ctime_ns=st.st_ctime_ns,
            born=born,
            sha256=known,
            rule=made_by[0],
            fingerprint=made_by[1],
        )
        job = Job(
            source=candidate.path,
            key=candidate.key,
            name=name,
            rule=rule,
            queue=self.queue,
            max_bytes=self.limits.max_bytes,
            max_pixels=self.limits.max_pixels,
            known_sha256=known,
            frame_sha256=entry.frame_sha256 if entry is not None and entry.output_name == name else None,
            gone=gone,
            adopt=not self.force,
            last_try=attempt >= self.limits.max_attempts,
            rejected_as=None if self.force else _rejected_as(entry) or self.rejected_before.pop(candidate.key, None),
            frame_refs=self.frame_refs,
        )
        self.in_flight[self.pool.submit(job)] = (candidate, job)

    def _output_name(self, candidate: Candidate, *, instead_of: str | None = None) -> str:
        """The source's output name; a name is free while nothing, or only this source's own frame, is there."""
        return self.ledger.name_for(
            candidate.key,
            safe_stem(candidate.name_source),
            exists=lambda n: not ownership.is_own_or_free(self.publisher, n, candidate.key, candidate.path),
            instead_of=instead_of,
            own=lambda n: ownership.is_own(self.publisher, n, candidate.key, candidate.path),
        )

    def _name_taken(self, candidate: Candidate, job: Job, outcome: Outcome) -> None:
        """The worker found someone else's file at the source's name: leave it, and try again under a new name."""
        new = self._output_name(candidate, instead_of=job.name)
        self.metrics.frames_renamed.inc()
        message = (outcome.error or {}).get("message", "")
        logger.bind(source=candidate.key, frame=f"{new}.png").warning(
            "{}: left as it is; {} goes to {}.png from now on", message, candidate.key, new
        )
        self._put_back(candidate)

    def _collect(self, timeout: float) -> int:
        signal: list[Future[Any]] = [self.wakeup()] if self.wakeup is not None else []
        if not self.in_flight:
            # Idle: this wait is what keeps the loop from spinning a core.
            if signal:
                wait(signal, timeout=timeout)
            else:
                time.sleep(timeout)
            return 0
        done, _ = wait([*self.in_flight, *signal], timeout=timeout, return_when=FIRST_COMPLETED)
        done = {future for future in done if future in self.in_flight}
        crashed: list[tuple[Candidate, Job]] = []
        failure: SinkwatchError | None = None
        for future in done:
            candidate, job = self.in_flight.pop(future)
            try:
                outcome = future.result()
            except BrokenProcessPool:
                crashed.append((candidate, job))
                continue
            self.suspects.discard(job.key)
            if outcome.status == "name_taken":
                self._name_taken(candidate, job, outcome)
                continue
            # Publish latency counts watch events only: a scanned or retried source may have sat complete for long.
            seen_at = candidate.seen_at if candidate.source == "event" else None
            try:
                self.outcomes.handle(job, outcome, seen_at=seen_at)
            except SinkwatchError as exc:
                # The outcome could not be recorded (ledger disk full): do the source again later.
                self.pending[candidate.key] = candidate
                failure = exc
            again = self.recheck.pop(job.key, None)
            if again is not None and not self._already_done(again):
                self.pending.setdefault(job.key, again)  # past the bound by at most the jobs in flight
        if crashed:
            crashed += [self.in_flight.pop(future) for future in list(self.in_flight)]
            for candidate, job in crashed:
                self._worker_died(candidate, job, alone=len(crashed) == 1)
            self._replace_pool()
        if failure is not None:
            raise failure
        return len(done)

    def drain(self) -> None:
        """Wait for everything in flight (graceful stop); pending work stays for next time."""
        while self.in_flight:
            self._collect(timeout=0.5)
        self.metrics.in_flight.set(0)

    def _replace_pool(self) -> None:
        for pid, lines in self.pool.replace().items():
            for line in lines:
                # Often what a codec said before it crashed the worker: the only clue there is.
                logger.bind(worker=pid).warning("worker {} printed, in a job it did not finish: {}", pid, line)

    def _worker_died(self, candidate: Candidate, job: Job, *, alone: bool, whole: bool = False) -> None:
        self.recheck.pop(job.key, None)  # tried again anyway, or rejected
        if self.outcomes.worker_died(job, alone=alone, whole=whole):
            self.suspects.add(job.key)
            self.pending[job.key] = candidate
            if job.rejected_as is not None:
                self.rejected_before[job.key] = job.rejected_as
        else:
            self.suspects.discard(job.key)


def _told_first(known: Candidate | None, offered: Candidate) -> Candidate:
    """Of two offers of one source, the one a watch event made: it tells how the file came (an edit saved by a
    rename), where a scan that found it too would see only another file at the path."""
    return known if known is not None and known.source == "event" and offered.source != "event" else offered


def _another_file(entry: Entry, st: os.stat_result, born: int | None) -> bool:
    """Whether the file at the source's path is not the one its processing last started on: by birth time, else
    (a file system that keeps none) by inode, which ext4 may hand the next file made after a deletion."""
    if entry.born is not None and born is not None:
        return entry.born != born
    return entry.ino is not None and entry.ino != st.st_ino


def _rejected_as(entry: Entry | None) -> Rejection | None:
    if entry is None or entry.state != "rejected" or entry.reason is None or entry.sha256 is None:
        return None
    return Rejection(entry.reason, entry.sha256, entry.message or "")


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False  # gone, or unreadable: `service.unchanged` counts either as done
