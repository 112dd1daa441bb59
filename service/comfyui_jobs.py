"""Whether ComfyUI still holds the video jobs sinkwatch queued on it, and how they ended.

ComfyUI keeps its queue and its history in memory only. A restart (a video job
that runs out of GPU memory and takes the server down with it is the common
one) drops every prompt still waiting, and nothing tells the client that
queued them: the frames are there, the videos never come. So the daemon looks,
every ``--comfyui-check-every`` seconds while jobs it queued have not been seen
to end: one ``GET /queue``, then ``GET /history/{id}`` for each of those jobs
that is not in it (at most :data:`JOBS_PER_LOOK`, the longest waiting first):

- in the queue: waiting or running; looked at again next time;
- in the history: ended, ``success``, ``error`` (logged with ComfyUI's
  message, say an out-of-memory error) or ``interrupted`` (someone cancelled it);
- in neither: ComfyUI no longer knows it. When this daemon queued it or saw it
  in the queue, it is ``lost``: ComfyUI restarted, or someone deleted it.
  Otherwise it may as well have ended while no daemon watched, before a
  restart or a cleared history took it out of the history: ``unknown``, said
  once per look, without alarm.

A job that ends and is then wiped from the history by a restart before the next
look would pass for lost. So while one of the watched jobs runs, its history is
looked at every :data:`RUNNING_EVERY` seconds, and the end of a running job
brings the next full look forward (the next job starts then). What remains is
a restart within seconds of a job's end, or a job that starts and ends between
two full looks (one shorter than ``--comfyui-check-every``).

A lost job is reported. It is queued again only when asked
(``--comfyui-requeue-lost N``): from here, a job the user deleted looks the
same as one a restart dropped. A restart takes down the job that runs, so of
the jobs one look finds lost, the one ComfyUI would have run first is the
suspect: only its re-queue counts against its frame's N, and it goes back
last, so that the others are not lost with it again if it takes ComfyUI down
once more. A job that does so every time stops coming back after N restarts.

As with the uploads, one background thread does the HTTP and the main thread
(:meth:`JobWatch.pump`, from the daemon loop) reads the ledger, hands it the
jobs to look for, and applies what it found: ledger first, then the log and
``sinkwatch_comfyui_jobs_total``. A look ComfyUI does not answer is dropped
and made again next time; several in a row are logged as a warning, once. A
job whose history ComfyUI answers in a way that cannot be read (over the size
limit, a 500) stays waiting and costs a failed look, but the jobs behind it
are looked at.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from loguru import logger

from service.comfyui import ComfyClient, failure_of, interrupted, status_of
from service.errors import ComfyRejected, ComfyUnavailable
from service.ledger import Ledger
from service.ledger_uploads import Upload
from service.metrics import Metrics

JOBS_PER_LOOK = 100
RUNNING_EVERY = 5.0
# Failed looks in a row before the log says so (one is a ComfyUI restarting, which the lost jobs will tell).
FAILED_LOOKS_SAID = 3
# ComfyUI's error messages may run long (a whole CUDA message); the log keeps the start.
_MESSAGE_CAP = 400
# Jobs named in the one line that reports the unknown ones of a look.
_NAMED = 5


@dataclass(frozen=True)
class Sighting:
    """Where one job was found: ``pending`` or ``running`` (queue), ``success``, ``error`` or ``interrupted``
    (history), ``missing`` (neither), ``unseen`` (not in the history; the queue was not read)."""

    job: Upload
    state: str
    message: str = ""


@dataclass(frozen=True)
class Look:
    """A full look (the queue, then the history of the jobs not in it), or a quick one (the history only)."""

    jobs: list[Upload]
    full: bool


@dataclass(frozen=True)
class Found:
    """What one look found, and the last error it met (the jobs it did not get to, or could not read the
    history of, are not in it)."""

    look: Look
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
        running_every: float = RUNNING_EVERY,
        requeue: Callable[[Upload, bool], bool] | None = None,
        requeue_limit: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`requeue(job, counted)` owes ComfyUI the frame of a lost job again, counting it against the frame if
        `counted` (False if the frame moved on meanwhile); frames counted `requeue_limit` times are not."""
        if every <= 0 or running_every <= 0:
            raise ValueError(f"every and running_every must be positive, got {every}, {running_every}")
        self.client = client
        self.ledger = ledger
        self.metrics = metrics
        self.every = every
        self.running_every = min(running_every, every)
        self.requeue = requeue
        self.requeue_limit = requeue_limit if requeue is not None else 0
        self.clock = clock
        self._due = clock()  # of the next full look
        self._quick_due = clock()  # of the next look at the running jobs' history
        self._looking = False  # a look handed to the thread whose findings are not applied yet
        self._closed = False
        # Jobs this daemon queued or saw in the queue: gone from ComfyUI, they are lost, not unknown.
        self._seen: set[str] = set()
        self._running: dict[str, Upload] = {}  # by prompt_id, as the last full look found them
        self._failed = 0  # looks in a row that ComfyUI did not answer
        self._asked: queue.Queue[Look | None] = queue.Queue()
        self._found: queue.Queue[Found] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="sinkwatch-comfyui-jobs", daemon=True)
        self._thread.start()

    # -- main thread ----------------------------------------------------------

    def queued(self, prompt_id: str) -> None:
        """ComfyUI took this job from this daemon just now."""
        self._seen.add(prompt_id)

    def pump(self) -> None:
        """Apply what the last look found, then hand the thread the next look when one is due."""
        try:
            found = self._found.get_nowait()
        except queue.Empty:
            pass
        else:
            self._looking = False
            self._apply(found)
        if self._looking or self._closed:
            return
        now = self.clock()
        if now >= self._due:
            jobs = self.ledger.waiting_jobs(limit=JOBS_PER_LOOK)
            if len(jobs) < JOBS_PER_LOOK:
                self._seen &= {str(job.prompt_id) for job in jobs}  # the rest ended, or their frame moved on
            self._due = now + self.every
            if jobs:
                self._ask(Look(jobs, full=True))
        elif self._running and now >= self._quick_due:
            self._ask(Look(list(self._running.values()), full=False))

    def close(self, *, timeout: float) -> bool:
        """Stop the thread (a request in progress ends with the client's `stop_requests`); True if it ended.

        What it found stays to be applied by a last :meth:`pump`, which starts no new look."""
        self._closed = True
        self._asked.put(None)
        self._thread.join(timeout=timeout)
        return not self._thread.is_alive()

    def _ask(self, look: Look) -> None:
        self._looking = True
        self._quick_due = self.clock() + self.running_every
        self._asked.put(look)

    def _apply(self, found: Found) -> None:
        self._count_failure(found.error)
        if found.look.full and found.error is None:
            self._running = {}
        unknown: list[str] = []
        lost: list[Upload] = []
        for sighting in found.sightings:
            job, prompt_id = sighting.job, str(sighting.job.prompt_id)
            if sighting.state in ("pending", "running", "unseen"):
                self._seen.add(prompt_id)
                if sighting.state == "running":
                    self._running[prompt_id] = job
                continue
            ended = sighting.state
            if ended == "missing":
                ended = "lost" if prompt_id in self._seen else "unknown"
            if ended == "lost" and self.requeue_limit:
                lost.append(job)  # queued again below, with the others of this look
            elif not self._ended(job, ended, self._record(job, ended)):
                continue  # republished meanwhile: that job is not the frame's any more
            elif ended == "unknown":
                unknown.append(job.name)
            elif ended == "lost":
                self._say_lost(job, "nothing queues it again by itself")
            else:
                self._say(job, ended, sighting.message)
        self._requeue_lost(lost)
        if unknown:
            more = len(unknown) - _NAMED
            shown = ", ".join(unknown[:_NAMED]) + (f" and {more} more" if more > 0 else "")
            logger.info(
                "ComfyUI no longer knows {} video jobs queued before this daemon watched them ({}): they ended, or "
                "were dropped by a restart, while no sinkwatch was running; not counted as lost",
                len(unknown),
                shown,
            )

    def _record(self, job: Upload, ended: str) -> bool:
        return self.ledger.job_ended(job.name, generation=job.generation, prompt_id=str(job.prompt_id), job=ended)

    def _ended(self, job: Upload, ended: str, recorded: bool) -> bool:
        """After the ledger write (`recorded`: False if the frame moved on meanwhile): forget the job, count it."""
        self._seen.discard(str(job.prompt_id))
        if self._running.pop(str(job.prompt_id), None) is not None:
            self._due = self.clock()  # the next job starts now: see which
        if recorded:
            self.metrics.comfyui_jobs.labels(outcome=ended).inc()
        return recorded

    def _requeue_lost(self, jobs: list[Upload]) -> None:
        """Queue the frames of the jobs one look found lost again, the suspect (the longest waiting) last."""
        if not jobs:
            return
        assert self.requeue is not None  # a limit comes with a way to requeue
        jobs.sort(key=lambda job: (job.updated, job.name))
        suspect = jobs[0]
        for job in [*jobs[1:], suspect]:
            if job is suspect and job.requeued >= self.requeue_limit:
                if self._ended(job, "lost", self._record(job, "lost")):
                    self._say_lost(job, f"not queued again ({job.requeued} of {self.requeue_limit} done already)")
                continue
            # Ledger first: a write that fails leaves the job waiting, to be found lost again at the next look.
            if not self._ended(job, "lost", self.requeue(job, job is suspect)):
                continue
            if job is suspect:
                self._say_lost(job, f"queuing it again ({job.requeued + 1} of {self.requeue_limit})")
            else:
                self._say_lost(job, f"queuing it again, not counted: the job of {suspect.name} ran before it")

    def _count_failure(self, error: BaseException | None) -> None:
        if error is None:
            if self._failed >= FAILED_LOOKS_SAID:
                logger.info("ComfyUI answers about its video jobs again")
            self._failed = 0
            return
        self._failed += 1
        known = isinstance(error, ComfyUnavailable | ComfyRejected)
        if not known:  # a bug: its traceback, every time
            logger.opt(exception=error).error("could not look at ComfyUI's video jobs: {}", error)
        elif self._failed == FAILED_LOOKS_SAID:
            logger.warning(
                "could not look at ComfyUI's video jobs {} times in a row: {}; lost jobs go unnoticed meanwhile, "
                "looking again every {:g}s",
                self._failed,
                error,
                self.every,
            )
        else:
            logger.debug("could not look at ComfyUI's video jobs: {}", error)

    def _say(self, job: Upload, ended: str, message: str) -> None:
        prompt_id = str(job.prompt_id)
        log = logger.bind(frame=job.name, prompt_id=prompt_id)
        if ended == "success":
            log.debug("ComfyUI finished the video job for {} (prompt {})", job.name, prompt_id)
        elif ended == "interrupted":
            log.info("the video job for {} was interrupted in ComfyUI (prompt {})", job.name, prompt_id)
        else:
            said = message[:_MESSAGE_CAP] + ("..." if len(message) > _MESSAGE_CAP else "") if message else "no message"
            log.warning("ComfyUI's video job for {} failed (prompt {}): {}", job.name, prompt_id, said)

    def _say_lost(self, job: Upload, then: str) -> None:
        prompt_id = str(job.prompt_id)
        logger.bind(frame=job.name, prompt_id=prompt_id).warning(
            "ComfyUI lost the video job for {} (prompt {}): it is neither in its queue nor in its history, so "
            "ComfyUI restarted or the job was deleted; {}",
            job.name,
            prompt_id,
            then,
        )

    # -- the thread -----------------------------------------------------------

    def _run(self) -> None:
        while (look := self._asked.get()) is not None:
            self._found.put(self._look(look))

    def _look(self, look: Look) -> Found:
        sightings: list[Sighting] = []
        try:
            # The queue before any history: a job that ends meanwhile is in the history when that is read.
            running, pending = self.client.queue_ids() if look.full else (set[str](), set[str]())
        except Exception as exc:  # a bug must cost one look, never the thread
            return Found(look, sightings, exc)
        error: BaseException | None = None
        for job in look.jobs:
            prompt_id = str(job.prompt_id)
            if prompt_id in running or prompt_id in pending:
                sightings.append(Sighting(job, "running" if prompt_id in running else "pending"))
                continue
            try:
                sightings.append(self._in_history(job, missing="missing" if look.full else "unseen"))
            except Exception as exc:
                error = exc
                if isinstance(exc, ComfyUnavailable) and exc.status is None:
                    break  # no answer: ComfyUI went away, the jobs behind would fare no better
                # An answer about this job that cannot be read (too long, a 500): the jobs behind it still are.
        return Found(look, sightings, error)

    def _in_history(self, job: Upload, *, missing: str) -> Sighting:
        entry = self.client.history(str(job.prompt_id))
        if entry is None:
            return Sighting(job, missing)
        if status_of(entry) == "success":
            return Sighting(job, "success")
        if interrupted(entry):
            return Sighting(job, "interrupted")
        return Sighting(job, "error", failure_of(entry))
