"""The work engine shared by the daemon and `sinkwatch process`.

It owns the pending set (deduplicated, bounded), the ledger checks that make
processing idempotent, dispatch to the worker pool with a bounded number in
flight, and the one place where outcomes become ledger rows, reject records,
metrics and log lines. It is driven from a single thread by `pump()`.
"""

from __future__ import annotations

import os
import stat
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from service import recovery
from service.errors import PublishError, SinkwatchError
from service.ledger import Ledger
from service.metrics import Metrics
from service.naming import safe_stem
from service.pool import WorkerPool
from service.publish import Publisher
from service.rules import Rule, RuleSet
from service.runner import Job, Outcome

# Disk full or read-only queue: keep trying, slower and slower, but never reject an image for it.
MAX_PUBLISH_RETRY_DELAY = 300.0


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
    ) -> None:
        self.queue = queue
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
        self.publisher = Publisher(queue)
        self.pending: OrderedDict[str, Candidate] = OrderedDict()
        self.in_flight: dict[Future[Outcome], tuple[Candidate, Job]] = {}
        # Called with (name, key, width, height) after each publish, e.g. to upload to a remote ComfyUI.
        self.on_published: Callable[[str, str, int, int], None] | None = None
        self.counts = {"published": 0, "rejected": 0, "retried": 0, "skipped": 0}

    # -- finding work ---------------------------------------------------------

    def offer(self, candidate: Candidate) -> bool:
        """Queue a candidate unless it is already queued, running or done; False when full."""
        if candidate.key in self.pending or self._running(candidate.key):
            return True
        if not self.force and self._already_done(candidate):
            return True
        if len(self.pending) >= self.limits.queue_size:
            return False
        self.pending[candidate.key] = candidate
        if candidate.source in ("event", "scan", "startup"):
            self.metrics.discovered.labels(source=candidate.source).inc()
        return True

    def has_room(self) -> bool:
        return len(self.pending) < self.limits.queue_size

    def _running(self, key: str) -> bool:
        return any(job.key == key for _candidate, job in self.in_flight.values())

    def _already_done(self, candidate: Candidate) -> bool:
        try:
            st = os.stat(candidate.path)
        except OSError:
            return True  # gone already: nothing to do, nothing lost
        if not stat.S_ISREG(st.st_mode):
            return True
        entry = self.ledger.get(candidate.key)
        if entry is None:
            return False
        same_file = (entry.size, entry.mtime_ns) == (st.st_size, st.st_mtime_ns)
        if entry.state in ("published", "rejected"):
            return same_file
        if entry.state == "retry" and candidate.source != "retry":
            return same_file  # unchanged: its scheduled retry will come
        return False

    def requeue_due(self) -> None:
        for entry in self.ledger.due(self.clock()):
            if not self.has_room():
                return
            self.offer(Candidate(entry.relpath, self.resolve(entry.relpath), "retry", self.clock()))

    def recover(self) -> int:
        """After a crash: settle the rows a dead run left in "processing"; returns how many (see `service.recovery`)."""
        return recovery.recover(
            self.ledger,
            self.publisher,
            resolve=self.resolve,
            requeue=lambda key, path: self.offer(Candidate(key, path, "retry", self.clock())),
        )

    # -- dispatch -------------------------------------------------------------

    def pump(self, *, timeout: float = 0.05) -> int:
        """Dispatch what fits, collect what finished; returns outcomes handled."""
        while self.pending and len(self.in_flight) < 2 * self.pool.workers:
            _key, candidate = self.pending.popitem(last=False)
            try:
                self._dispatch(candidate)
            except SinkwatchError:
                # The ledger could not record the start (its disk is full): keep the work for later.
                self.pending[candidate.key] = candidate
                self.pending.move_to_end(candidate.key, last=False)
                raise
        handled = self._collect(timeout)
        self.metrics.queue_depth.set(len(self.pending))
        self.metrics.in_flight.set(len(self.in_flight))
        return handled

    def idle(self) -> bool:
        return not self.pending and not self.in_flight

    def retrying(self, max_attempts: int) -> bool:
        """Whether any source still waits for a retry that may yet succeed."""
        return any(entry.attempts < max_attempts for entry in self.ledger.entries("retry"))

    def _dispatch(self, candidate: Candidate) -> None:
        try:
            st = os.stat(candidate.path)
        except OSError:
            return
        entry = self.ledger.get(candidate.key)
        rule = self.forced_rule or self.rules.select(candidate.name_source)
        name = self.ledger.name_for(
            candidate.key,
            safe_stem(candidate.name_source),
            exists=lambda n: recovery.taken(self.publisher, n, candidate.key),
        )
        known = entry.sha256 if entry and entry.state == "published" and not self.force else None
        self.ledger.start(
            candidate.key,
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            sha256=known,
            rule=rule.name,
            fingerprint=rule.fingerprint,
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
        )
        self.in_flight[self.pool.submit(job)] = (candidate, job)

    def _collect(self, timeout: float) -> int:
        signal = [self.wakeup()] if self.wakeup is not None else []
        if not self.in_flight:
            # Idle: this wait is what keeps the loop from spinning a core.
            if signal:
                wait(signal, timeout=timeout)
            else:
                time.sleep(timeout)
            return 0
        done, _ = wait([*self.in_flight, *signal], timeout=timeout, return_when=FIRST_COMPLETED)
        done = {future for future in done if future in self.in_flight}
        broken = False
        failure: SinkwatchError | None = None
        for future in done:
            candidate, job = self.in_flight.pop(future)
            try:
                outcome = future.result()
            except BrokenProcessPool:
                broken = True
                self._worker_died(candidate, job)
                continue
            try:
                self._handle(candidate, job, outcome)
            except SinkwatchError as exc:
                # The outcome could not be recorded (ledger disk full): do the source again later.
                self.pending[candidate.key] = candidate
                failure = exc
        if broken:
            for future, (candidate, job) in list(self.in_flight.items()):
                del self.in_flight[future]
                self._worker_died(candidate, job)
            self.pool.replace()
        if failure is not None:
            raise failure
        return len(done)

    def drain(self) -> None:
        """Wait for everything in flight (graceful stop); pending work stays for next time."""
        while self.in_flight:
            self._collect(timeout=0.5)
        self.metrics.in_flight.set(0)

    # -- outcomes -------------------------------------------------------------

    def _handle(self, candidate: Candidate, job: Job, outcome: Outcome) -> None:
        if outcome.status == "published":
            self._published(candidate, job, outcome)
        elif outcome.status == "skipped":
            self._skipped(candidate, job, outcome)
        elif outcome.status == "retry":
            self._retry_or_reject(candidate, job, outcome)
        else:
            self._reject(job, outcome.error or {}, outcome)

    def _published(self, candidate: Candidate, job: Job, outcome: Outcome) -> None:
        self.ledger.published(
            job.key,
            size=outcome.size,
            mtime_ns=outcome.mtime_ns,
            sha256=outcome.sha256,
            rule=outcome.rule,
            fingerprint=outcome.fingerprint,
        )
        self._count(outcome.rule, "published")
        m = self.metrics
        for stage, seconds in outcome.timings.items():
            m.stage_seconds.labels(stage=stage).observe(seconds)
        m.energy_before.observe(outcome.scores["energy_mean_before"])
        m.energy_after.observe(outcome.scores["energy_mean_after"])
        m.mask_coverage.observe(outcome.scores["mask_coverage"])
        m.last_publish.set(outcome.finished_at)
        if candidate.source == "event":
            m.latency_seconds.observe(max(0.0, outcome.finished_at - candidate.seen_at))
        if self.on_published is not None:
            self.on_published(job.name, job.key, int(outcome.scores["width"]), int(outcome.scores["height"]))
        logger.bind(source=job.key, rule=outcome.rule, frame=outcome.outputs.get("frame")).info(
            "published {} -> {} (rule {}, coverage {:.1%}, {:.0f} ms)",
            job.key,
            outcome.outputs.get("frame"),
            outcome.rule,
            outcome.scores["mask_coverage"],
            1000 * sum(outcome.timings.values()),
        )

    def _skipped(self, candidate: Candidate, job: Job, outcome: Outcome) -> None:
        entry = self.ledger.get(job.key)
        if outcome.sha256 is None or entry is None:
            self.ledger.forget(job.key)  # vanished before it could be read
            return
        # Same content under a new mtime (a touch, a copy): refresh the cheap check, keep the outputs.
        self.ledger.published(
            job.key,
            size=outcome.size,
            mtime_ns=outcome.mtime_ns,
            sha256=outcome.sha256,
            rule=entry.rule,
            fingerprint=entry.fingerprint,
        )
        self._count(outcome.rule, "skipped")
        logger.bind(source=job.key).debug("unchanged content, skipped {}", job.key)

    def _retry_or_reject(self, candidate: Candidate, job: Job, outcome: Outcome) -> None:
        error = dict(outcome.error or {})
        entry = self.ledger.get(job.key)
        attempts = entry.attempts if entry else 1
        is_publish = error.get("reason") == "publish"
        if not is_publish and attempts >= self.limits.max_attempts:
            error["message"] = f"{error.get('message')} (gave up after {attempts} attempts)"
            self._reject(job, error, outcome)
            return
        delay = self.limits.retry_base * 2.0 ** min(attempts - 1, 32)  # a full disk may retry for weeks
        if is_publish:
            delay = min(delay, MAX_PUBLISH_RETRY_DELAY)
        self.ledger.retry(
            job.key,
            reason=str(error.get("reason")),
            message=str(error.get("message")),
            next_attempt=self.clock() + delay,
        )
        if is_publish:  # counted once the retry is recorded, like processed{outcome="retried"}
            self.metrics.publish_errors.labels(reason=str(error.get("publish_reason", "other"))).inc()
        self._count(outcome.rule, "retried")
        logger.bind(source=job.key, reason=error.get("reason")).warning(
            "retrying {} in {:.0f}s (attempt {}): {}", job.key, delay, attempts, error.get("message")
        )

    def _reject(self, job: Job, error: dict[str, object], outcome: Outcome) -> None:
        reason = str(error.get("reason", "corrupt"))
        record = {**error, "key": job.key, "source": str(job.source), "rule": job.rule.name}
        try:
            self.publisher.reject(job.name, record)
        except PublishError as exc:
            self.metrics.record_publish_error(exc)
            logger.bind(source=job.key, reason="publish").warning(
                "cannot write the reject record of {}, retrying: {}", job.key, exc.message
            )
            # Without its reject record the rejection would be invisible: try again later.
            self.ledger.retry(
                job.key, reason="publish", message=exc.message, next_attempt=self.clock() + self.limits.retry_base
            )
            self._count(job.rule.name, "retried")
            return
        self.ledger.rejected(
            job.key,
            reason=reason,
            message=str(error.get("message")),
            size=outcome.size,
            mtime_ns=outcome.mtime_ns,
            sha256=outcome.sha256,
        )
        self._count(job.rule.name, "rejected")
        self.metrics.rejected.labels(reason=reason).inc()
        logger.bind(source=job.key, reason=reason).error("rejected {} ({}): {}", job.key, reason, error.get("message"))

    def _worker_died(self, candidate: Candidate, job: Job) -> None:
        entry = self.ledger.get(job.key)
        attempts = entry.attempts if entry else 1
        if attempts >= self.limits.max_attempts:
            error: dict[str, object] = {
                "error": "WorkerCrashed",
                "reason": "crashed",
                "transient": False,
                "message": f"a worker process died on this image {attempts} times",
            }
            self._reject(job, error, Outcome(job.key, job.name, job.rule.name, job.rule.fingerprint, "rejected"))
            return
        logger.bind(source=job.key).warning("a worker died while processing {}; trying again", job.key)
        self.pending[job.key] = candidate

    def _count(self, rule: str, outcome: str) -> None:
        self.counts[outcome] += 1
        self.metrics.processed.labels(rule=rule, outcome=outcome).inc()
