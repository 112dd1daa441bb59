"""Whether ComfyUI still holds the video jobs sinkwatch queued on it, and how they ended.

ComfyUI keeps its queue and its history in memory only. A restart (a video job
that runs out of GPU memory and takes the server down with it is the common
one) drops every prompt still waiting, and nothing tells the client that
queued them: the frames are there, the videos never come. So the daemon asks,
every ``--comfyui-check-every`` seconds while jobs it queued have not been seen
to end: one ``GET /queue``, then ``GET /history/{id}`` for each of those jobs
that is not in it (at most :data:`JOBS_PER_CHECK`, the longest waiting first):

- in the queue: still waiting or running; asked again at the next check;
- in the history: ended, ``success`` or ``error`` (logged with ComfyUI's
  message, say an out-of-memory error);
- in neither: ComfyUI no longer knows it. When this daemon queued it or saw it
  waiting, it is ``lost``: ComfyUI restarted, or someone deleted it from the
  queue. Otherwise it may just as well have ended while no daemon watched,
  before a restart or a cleared history took it out of the history:
  ``unknown``, said once per check without alarm.

A lost job is reported, not queued again: from here, a job the user deleted
looks the same as one a restart dropped.

As with the uploads, one background thread does the HTTP and the main thread
(:meth:`JobWatch.pump`, from the daemon loop) reads the ledger, hands it the
jobs to look for, and applies what it found: ledger first, then the log and
``sinkwatch_comfyui_jobs_total``. A check ComfyUI does not answer is dropped
and made again at the next one.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from loguru import logger

from service.comfyui import ComfyClient, failure_of, status_of
from service.errors import ComfyRejected, ComfyUnavailable
from service.ledger import Ledger
from service.ledger_uploads import Upload
from service.metrics import Metrics

JOBS_PER_CHECK = 100
# ComfyUI's error messages may run long (a whole CUDA message); the log keeps the start.
_MESSAGE_CAP = 400
# Jobs named in the one line that reports the unknown ones of a check.
_NAMED = 5


@dataclass(frozen=True)
class Sighting:
    """Where one job was found: ``waiting`` (queue), ``success`` or ``error`` (history), ``missing`` (neither)."""

    job: Upload
    state: str
    message: str = ""


@dataclass(frozen=True)
class Check:
    """What one check found, and the error that cut it short (the jobs it did not get to are not in it)."""

    sightings: list[Sighting] = field(default_factory=list)
    error: BaseException | None = None


class JobWatch:
    def __init__(
        self,
        *,
        client: ComfyClient,
        ledger: Ledger,
        metrics: Metrics,
        every: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if every <= 0:
            raise ValueError(f"every must be positive, got {every}")
        self.client = client
        self.ledger = ledger
        self.metrics = metrics
        self.every = every
        self.clock = clock
        self._due = clock()
        self._checking = False  # a check handed to the thread whose findings are not applied yet
        self._closed = False
        # Jobs this daemon queued or saw waiting: gone from ComfyUI, they are lost, not unknown.
        self._seen: set[str] = set()
        self._asked: queue.Queue[list[Upload] | None] = queue.Queue()
        self._found: queue.Queue[Check] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="sinkwatch-comfyui-jobs", daemon=True)
        self._thread.start()

    # -- main thread ----------------------------------------------------------

    def queued(self, prompt_id: str) -> None:
        """ComfyUI took this job from this daemon just now."""
        self._seen.add(prompt_id)

    def pump(self) -> None:
        """Apply what the last check found, then hand the thread the next check when it is due."""
        try:
            check = self._found.get_nowait()
        except queue.Empty:
            pass
        else:
            self._checking = False
            self._due = self.clock() + self.every
            self._apply(check)
        if self._checking or self._closed or self.clock() < self._due:
            return
        jobs = self.ledger.waiting_jobs(limit=JOBS_PER_CHECK)
        if not jobs:
            self._due = self.clock() + self.every
            return
        self._checking = True
        self._asked.put(jobs)

    def close(self, *, timeout: float) -> bool:
        """Stop the thread (a request in progress ends with the client's `stop_requests`); True if it ended.

        What it found stays to be applied by a last :meth:`pump`, which starts no new check."""
        self._closed = True
        self._asked.put(None)
        self._thread.join(timeout=timeout)
        return not self._thread.is_alive()

    def _apply(self, check: Check) -> None:
        if check.error is not None:
            # Not "ComfyUI is down": the uploads say that, when there is something to send. Asked again later.
            known = isinstance(check.error, ComfyUnavailable | ComfyRejected)
            logger.opt(exception=None if known else check.error).log(
                "DEBUG" if known else "ERROR", "could not ask ComfyUI about its video jobs: {}", check.error
            )
        unknown: list[str] = []
        for sighting in check.sightings:
            job, prompt_id = sighting.job, str(sighting.job.prompt_id)
            if sighting.state == "waiting":
                self._seen.add(prompt_id)
                continue
            ended = sighting.state
            if ended == "missing":
                ended = "lost" if prompt_id in self._seen else "unknown"
            recorded = self.ledger.job_ended(job.name, generation=job.generation, prompt_id=prompt_id, job=ended)
            self._seen.discard(prompt_id)
            if not recorded:
                continue  # republished meanwhile: that job is not the frame's any more
            self.metrics.comfyui_jobs.labels(outcome=ended).inc()
            if ended == "unknown":
                unknown.append(job.name)
            else:
                self._say(job, prompt_id, ended, sighting.message)
        if unknown:
            more = len(unknown) - _NAMED
            shown = ", ".join(unknown[:_NAMED]) + (f" and {more} more" if more > 0 else "")
            logger.info(
                "ComfyUI no longer knows {} video jobs queued before this daemon watched them ({}): they ended, or "
                "were dropped by a restart, while no sinkwatch was running; not counted as lost",
                len(unknown),
                shown,
            )

    def _say(self, job: Upload, prompt_id: str, ended: str, message: str) -> None:
        log = logger.bind(frame=job.name, prompt_id=prompt_id)
        if ended == "success":
            log.debug("ComfyUI finished the video job for {} (prompt {})", job.name, prompt_id)
        elif ended == "error":
            said = message[:_MESSAGE_CAP] + ("..." if len(message) > _MESSAGE_CAP else "") if message else "no message"
            log.warning("ComfyUI's video job for {} failed (prompt {}): {}", job.name, prompt_id, said)
        else:
            log.warning(
                "ComfyUI lost the video job for {} (prompt {}): it is neither in its queue nor in its history, so "
                "ComfyUI restarted or the job was deleted; nothing queues it again by itself",
                job.name,
                prompt_id,
            )

    # -- the thread -----------------------------------------------------------

    def _run(self) -> None:
        while (jobs := self._asked.get()) is not None:
            self._found.put(self._look(jobs))

    def _look(self, jobs: list[Upload]) -> Check:
        sightings: list[Sighting] = []
        try:
            # The queue before any history: a job that ends meanwhile is in the history when that is read.
            waiting = self.client.queued_ids()
            for job in jobs:
                sightings.append(self._sighting(job, waiting))
        except Exception as exc:  # a bug must cost one check, never the thread
            return Check(sightings, exc)
        return Check(sightings)

    def _sighting(self, job: Upload, waiting: set[str]) -> Sighting:
        prompt_id = str(job.prompt_id)
        if prompt_id in waiting:
            return Sighting(job, "waiting")
        entry = self.client.history(prompt_id)
        if entry is None:
            return Sighting(job, "missing")
        if status_of(entry) == "success":
            return Sighting(job, "success")
        return Sighting(job, "error", failure_of(entry))
