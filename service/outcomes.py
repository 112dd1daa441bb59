"""Where a finished job becomes its ledger row, reject record, metrics and log line.

The engine dispatches and collects; everything it learns about a source ends
here, in one place, so the ledger, the counts and the metrics can never tell
different stories. The pending set stays the engine's: `worker_died` only says
whether the source should go back into it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from loguru import logger

from service.errors import MadeFromFrame, PublishError
from service.ledger import Ledger
from service.metrics import Metrics
from service.png_chunks import TEXT_TOTAL_LIMIT, TEXT_VALUE_LIMIT
from service.publish import Publisher
from service.runner import Job, Outcome, rejection_sha256

# Disk full or read-only queue: keep trying, slower and slower, but never reject an image for it.
MAX_PUBLISH_RETRY_DELAY = 300.0

# Called with (name, key, width, height) after each publish, e.g. to upload to a remote ComfyUI.
OnPublished = Callable[[str, str, int, int], None]


class Outcomes:
    def __init__(
        self,
        *,
        ledger: Ledger,
        publisher: Publisher,
        metrics: Metrics,
        max_attempts: int,
        retry_base: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ledger = ledger
        self.publisher = publisher
        self.metrics = metrics
        self.max_attempts = max_attempts
        self.retry_base = retry_base
        self.clock = clock
        self.on_published: OnPublished | None = None
        self.counts = {"published": 0, "rejected": 0, "retried": 0, "skipped": 0, "ignored": 0}

    def handle(self, job: Job, outcome: Outcome, *, seen_at: float | None) -> None:
        """Record what a worker reported; `seen_at` (wall clock) starts the publish latency, None: not measured."""
        for line in outcome.codec_messages:
            logger.bind(source=job.key).warning("{}: the codec said: {}", job.key, line)
        if outcome.status == "published":
            self._published(job, outcome, seen_at)
        elif outcome.status == "skipped":
            self._skipped(job, outcome)
        elif outcome.status == "adopted":
            self._adopted(job, outcome)
        elif outcome.status == "retry":
            self._retry_or_reject(job, outcome)
        else:
            self._reject(job, outcome.error or {}, outcome)

    def worker_died(self, job: Job, *, alone: bool, whole: bool = False) -> bool:
        """A worker process died while `job` ran (with the daemon too, when `whole`); True to try it again.

        A dead worker fails every job in flight, so only a job that ran `alone` is known to have
        killed it; that one is rejected once it happened too often. The others are tried again, and
        the attempt is not counted for them.
        """
        entry = self.ledger.get(job.key)
        attempts = entry.attempts if entry else 1
        killed = "sinkwatch was killed" if whole else "a worker process died"
        if alone and attempts >= self.max_attempts:
            error: dict[str, object] = {
                "error": "ServiceKilled" if whole else "WorkerCrashed",
                "reason": "crashed",
                "transient": False,
                "message": f"{killed} on this image (attempt {attempts} of {self.max_attempts})",
            }
            # Hashed here, where the worker could not (as the ledger's start recorded the file): the same bytes
            # touched again are not run again.
            sha256 = rejection_sha256(job, (entry.size, entry.mtime_ns)) if entry else None
            self._reject(
                job, error, Outcome(job.key, job.name, job.rule.name, job.rule.fingerprint, "rejected", sha256=sha256)
            )
            return False
        if alone:
            message = f"{killed} while processing {job.key}; trying again"
        elif whole:
            message = f"sinkwatch was killed while {job.key} was in flight; trying it again on its own"
        else:
            message = f"a worker died while {job.key} was in flight with others; trying it again on its own"
        self.ledger.worker_died(job.key, counted=alone, message=message, next_attempt=self.clock())
        self._count(job.rule.name, "retried")
        logger.bind(source=job.key).warning("{}", message)
        return True

    def _published(self, job: Job, outcome: Outcome, seen_at: float | None) -> None:
        self._record_outputs(job, outcome, owe_upload=True, counted="published")
        m = self.metrics
        for stage, seconds in outcome.timings.items():
            m.stage_seconds.labels(stage=stage).observe(seconds)
        m.energy_before.observe(outcome.scores["energy_mean_before"])
        m.energy_after.observe(outcome.scores["energy_mean_after"])
        m.mask_coverage.observe(outcome.scores["mask_coverage"])
        m.last_publish.set(outcome.finished_at)
        if seen_at is not None:
            m.latency_seconds.observe(max(0.0, outcome.finished_at - seen_at))
        logger.bind(source=job.key, rule=outcome.rule, frame=outcome.outputs.get("frame")).info(
            "published {} -> {} (rule {}, coverage {:.1%}, {:.0f} ms)",
            job.key,
            outcome.outputs.get("frame"),
            outcome.rule,
            outcome.scores["mask_coverage"],
            1000 * sum(outcome.timings.values()),
        )
        if outcome.metadata_left_out:
            # The sidecar names them too; a user who drags the frame into ComfyUI would find no workflow.
            logger.bind(source=job.key).warning(
                "{}: PNG text {} left out of the sidecar and the frame: over {} Mi characters each or {} Mi in all",
                job.key,
                ", ".join(repr(key) for key in outcome.metadata_left_out),
                TEXT_VALUE_LIMIT >> 20,
                TEXT_TOTAL_LIMIT >> 20,
            )

    def _record_outputs(
        self,
        job: Job,
        outcome: Outcome,
        *,
        owe_upload: bool,
        counted: str,
        made_by: tuple[str, str] | None = None,
    ) -> None:
        """The source's outputs that `outcome` names are in the queue: owe their upload, record them, count.

        `made_by`: the rule and fingerprint that made them, when not the outcome's.
        """
        size, mtime_ns, sha256 = _source_stat(outcome)
        rule, fingerprint = made_by or (outcome.rule, outcome.fingerprint)
        # The upload is owed first: a crash between the two leaves the row in "processing", and recovery,
        # which settles it, owes the upload again; the other order could lose it for good.
        if owe_upload and self.on_published is not None:
            self.on_published(job.name, job.key, int(outcome.scores["width"]), int(outcome.scores["height"]))
        self.ledger.published(
            job.key,
            size=size,
            mtime_ns=mtime_ns,
            ino=outcome.ino,
            ctime_ns=outcome.ctime_ns,
            sha256=sha256,
            rule=rule,
            fingerprint=fingerprint,
            frame_sha256=outcome.frame_sha256,
        )
        self._count(rule, counted)

    def _skipped(self, job: Job, outcome: Outcome) -> None:
        entry = self.ledger.get(job.key)
        if outcome.sha256 is None or entry is None:
            self.ledger.forget(job.key)
            logger.bind(source=job.key).info("{} was deleted before it could be read: nothing to do", job.key)
            return
        if entry.rule is None or entry.fingerprint is None:
            # The engine's Ledger.start recorded both before it dispatched the job.
            raise ValueError(
                f"the ledger entry of {job.key!r} has no rule or fingerprint "
                f"(rule={entry.rule!r}, fingerprint={entry.fingerprint!r}) though its processing started"
            )
        # Same content under a new mtime (a touch, a copy): refresh the cheap check, keep the outputs.
        made_by = (entry.rule, entry.fingerprint)
        self._record_outputs(job, outcome, owe_upload=False, counted="skipped", made_by=made_by)
        logger.bind(source=job.key).debug("unchanged content, skipped {}", job.key)

    def _adopted(self, job: Job, outcome: Outcome) -> None:
        # An upload the ledger no longer knew of is owed again, as for a publication.
        self._record_outputs(job, outcome, owe_upload=not outcome.upload_noted, counted="skipped")
        frame = outcome.outputs.get("frame")
        logger.bind(source=job.key, rule=outcome.rule, frame=frame).info(
            "kept {}: made from the current bytes of {} already (rule {})", frame, job.key, outcome.rule
        )

    def _retry_or_reject(self, job: Job, outcome: Outcome) -> None:
        error = dict(outcome.error or {})
        entry = self.ledger.get(job.key)
        attempts = entry.attempts if entry else 1
        is_publish = error.get("reason") == "publish"
        if not is_publish and attempts >= self.max_attempts:
            error["message"] = f"{error.get('message')} (gave up after {attempts} attempts)"
            self._reject(job, error, outcome)
            return
        delay = self._delay(attempts)
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
        # A file cut short at its first try with this content is one still being written (a slow share): every
        # pause of its writer longer than --settle-seconds says so once. Cut short again unchanged, it is news.
        level = "INFO" if error.get("reason") == "incomplete" and attempts == 1 else "WARNING"
        logger.bind(source=job.key, reason=error.get("reason")).log(
            level, "retrying {} in {:.1f}s (attempt {}): {}", job.key, delay, attempts, error.get("message")
        )

    def _delay(self, attempts: int) -> float:
        return self.retry_base * 2.0 ** min(attempts - 1, 32)  # a full disk may retry for weeks

    @property
    def longest_delay(self) -> float:
        """No retry is set further ahead than this: an incomplete file's last, or a publish retry's cap."""
        return max(self._delay(self.max_attempts), MAX_PUBLISH_RETRY_DELAY)

    def _reject(self, job: Job, error: Mapping[str, object], outcome: Outcome) -> None:
        reason = str(error.get("reason", "corrupt"))
        earlier = job.rejected_as
        # Only its stamp changed (a touch, a chmod, a restore from a backup): no new rejection to record, count or
        # tell; the ledger learns the new stamp, and its reject record stays as it was.
        again = earlier is not None and (reason, outcome.sha256) == (earlier.reason, earlier.sha256)
        # A video job's image beside the generator's is left alone by design: rejected/ keeps the images that
        # failed, not one record per video.
        ignored = reason == MadeFromFrame.reason
        record = {**error, "key": job.key, "source": str(job.source), "rule": job.rule.name}
        try:
            if not again and not ignored:
                self.publisher.reject(job.name, record)
        except PublishError as exc:
            self.metrics.record_publish_error(exc)
            logger.bind(source=job.key, reason="publish").warning(
                "cannot write the reject record of {}, retrying: {}", job.key, exc.message
            )
            # Without its reject record the rejection would be invisible: try again later.
            self.ledger.retry(
                job.key, reason="publish", message=exc.message, next_attempt=self.clock() + self.retry_base
            )
            self._count(job.rule.name, "retried")
            return
        self.ledger.rejected(
            job.key,
            reason=reason,
            message=earlier.message if again and earlier is not None else str(error.get("message")),
            size=outcome.size,
            mtime_ns=outcome.mtime_ns,
            ino=outcome.ino,
            ctime_ns=outcome.ctime_ns,
            sha256=outcome.sha256,
        )
        if again:
            self._count(job.rule.name, "skipped")
            logger.bind(source=job.key, reason=reason).debug("unchanged content, rejected as before: {}", job.key)
            return
        if ignored:
            self._count(job.rule.name, "ignored")
            logger.bind(source=job.key, reason=reason).info("ignored {}: {}", job.key, error.get("message"))
            return
        self._count(job.rule.name, "rejected")
        self.metrics.rejected.labels(reason=reason).inc()
        logger.bind(source=job.key, reason=reason).error("rejected {} ({}): {}", job.key, reason, error.get("message"))

    def _count(self, rule: str, outcome: str) -> None:
        self.counts[outcome] += 1
        self.metrics.processed.labels(rule=rule, outcome=outcome).inc()


def _source_stat(outcome: Outcome) -> tuple[int, int, str]:
    """Size, mtime and hash of the source a worker read: the runner puts all three in every outcome that has a hash."""
    if outcome.size is None or outcome.mtime_ns is None or outcome.sha256 is None:
        raise ValueError(
            f"a {outcome.status} outcome must carry the source's size, mtime_ns and sha256; the one of "
            f"{outcome.key!r} has size={outcome.size}, mtime_ns={outcome.mtime_ns}, sha256={outcome.sha256}"
        )
    return outcome.size, outcome.mtime_ns, outcome.sha256
