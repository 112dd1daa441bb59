"""Published frames to a remote ComfyUI: upload each one and, optionally, queue a workflow on it.

Two threads, one job each. The main thread (the daemon loop) owns the ledger,
the sidecars, the metrics and the log: :meth:`Uploads.enqueue` records an
upload as pending in the ledger *before* anything is sent, and
:meth:`Uploads.pump` applies finished results. One background thread
(:mod:`service.upload_sender`) does only the HTTP work. Local publishing never
waits for it. A daemon that queues workflows has a third thread, which asks
ComfyUI how the video jobs ended (:mod:`service.comfyui_jobs`), applied by the
same pump.

The line between them (:mod:`service.upload_queue`) holds one task per output
name, so a frame republished while its upload waits is sent once, as it is
now. It holds at most ``max_tasks`` tasks; the ledger's pending rows are the
overflow, and :meth:`Uploads.pump` tops the line up from them when it runs low
(at start, :meth:`Uploads.resume` reads the first page only).

Nothing is lost: whatever has not been applied when the daemon stops is still
pending in the ledger and :meth:`Uploads.resume` sends it at the next start.
So a frame may reach ComfyUI twice (a stop after ComfyUI stored it but before
the ledger said so). For the frame that is harmless: in sinkwatch's own
subfolder an upload overwrites its own file, at the top level ComfyUI answers
the same content with the existing name (see service/comfyui.py). A workflow
is another matter (ComfyUI's cache keeps only the last prompt's outputs, so a
second one renders the video again): its prompt_id is in the ledger before the
workflow is sent, and a try after one that may have reached ComfyUI (no answer,
or a run that ended first) looks that id up before it sends the workflow again
(service/upload_sender.py), in the same run or in the next.

The sidecar note is a read-modify-write of ``QUEUE/matrix/<name>.json`` on the
main thread, while a worker process may be publishing a newer frame and
sidecar of that name. The daemon passes ``busy(name)`` ("a worker is
publishing this output name right now"); a result that would write the
sidecar of a busy name waits, whole, for a later pump. Whole, because noting
later and settling the ledger now would lose the note for good.
"""

from __future__ import annotations

import queue
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from loguru import logger

from service.comfyui import ComfyClient
from service.comfyui_jobs import JobWatch
from service.comfyui_status import ComfyStatus
from service.errors import ComfyRejected, PublishError, SinkwatchError
from service.ledger import Ledger
from service.ledger_uploads import Upload
from service.metrics import Metrics
from service.publish import Publisher
from service.upload_note import note_upload
from service.upload_queue import DEFAULT_LIMIT, Task, TaskQueue
from service.upload_sender import Result, Sender, is_final

__all__ = ["RETRY_BASE", "RETRY_CAP", "Result", "Task", "Uploads"]

# First retry after 1 s, doubling up to 30 s: a ComfyUI that comes back is noticed within half a minute.
RETRY_BASE = 1.0
RETRY_CAP = 30.0
# The pending-uploads gauge is recounted after a change, and at least this often (seconds).
RECOUNT_EVERY = 5.0


class Uploads:
    def __init__(
        self,
        *,
        client: ComfyClient,
        ledger: Ledger,
        publisher: Publisher,
        metrics: Metrics,
        workflow: Mapping[str, Any] | None,
        clock: Callable[[], float] = time.monotonic,
        retry_base: float = RETRY_BASE,
        retry_cap: float = RETRY_CAP,
        max_tasks: int = DEFAULT_LIMIT,
        busy: Callable[[str], bool] | None = None,
        check_jobs_every: float = 0.0,
        requeue_lost: int = 0,
    ) -> None:
        self.client = client
        self.ledger = ledger
        self.publisher = publisher
        self.metrics = metrics
        self.workflow = workflow
        self.clock = clock
        self.busy = busy
        self.status = ComfyStatus(url=client.base_url, metrics=metrics, clock=clock)
        self._tasks = TaskQueue(limit=max_tasks)
        self._spilled = False  # the ledger may hold pending uploads that are not in the line
        self._results: queue.Queue[Result] = queue.Queue()
        self._unapplied: deque[Result] = deque()
        self._waiting: deque[Result] = deque()  # results held back while a worker publishes their name
        self._recount_at: float | None = None  # None: recount the pending gauge at the next pump
        # Uploads failed for good since start (refused by ComfyUI, or the frame or template unusable here): a run
        # that ends says so in its exit code.
        self.refused = 0
        self._sender = Sender(
            client=client,
            publisher=publisher,
            workflow=workflow,
            tasks=self._tasks,
            results=self._results,
            retry_base=retry_base,
            retry_cap=retry_cap,
        )
        # Whether ComfyUI still holds the video jobs queued on it (0: not asked; a run that ends does not ask),
        # and how often a frame whose job it lost is sent again.
        self._jobs = (
            JobWatch(
                client=client,
                ledger=ledger,
                metrics=metrics,
                every=check_jobs_every,
                requeue=self._requeue if requeue_lost else None,
                requeue_limit=requeue_lost,
                clock=clock,
            )
            if workflow is not None and check_jobs_every > 0
            else None
        )

    @property
    def down(self) -> bool:
        return self.status.down

    # -- main thread ----------------------------------------------------------

    def resume(self) -> int:
        """At start: line up the uploads the ledger still has pending (a page now, the rest as it drains)."""
        pending = self.ledger.pending_upload_count()
        if pending:
            self._spilled = True
            self._refill()
            logger.info("resuming {} uploads to ComfyUI at {} left pending", pending, self.client.base_url)
        return pending

    def enqueue(self, name: str, key: str, width: int, height: int) -> None:
        """Owe ComfyUI the just-published frame `name` (ledger first), then line it up for the HTTP thread."""
        try:
            generation = self.ledger.upload_pending(name, relpath=key, width=width, height=height)
        except PublishError as exc:
            # The frame is published already; sending it still beats dropping it.
            logger.bind(frame=name).error(
                "cannot record the upload of {} ({}); it will not survive a restart", name, exc
            )
            generation = 0
        self._recount_at = None
        if self._tasks.put(Task(name, key, width, height, generation)):
            return
        if generation:
            self._spilled = True  # the ledger row is the task; a refill brings it back
        else:
            logger.bind(frame=name).error("{} uploads wait already; {} is not sent", self._tasks.limit, name)

    def pump(self) -> int:
        """Apply the results the HTTP thread has finished; returns how many.

        A result whose ledger write fails (disk full) stays first in line and
        is applied again by the next call, so the daemon may simply retry.
        Then top the line up from the ledger and set the pending gauge.
        """
        applied = self._apply_waiting()
        while True:
            if not self._unapplied:
                try:
                    self._unapplied.append(self._results.get_nowait())
                except queue.Empty:
                    break
            result = self._unapplied[0]
            if self._must_wait(result):
                self._waiting.append(result)
            else:
                self._apply(result)
                applied += 1
            self._unapplied.popleft()
        self._refill()
        self._count_pending()
        if self._jobs is not None:
            self._jobs.pump()
        return applied

    def _requeue(self, job: Upload, counted: bool) -> bool:
        """Send the frame of a lost video job again, with its workflow; False if the frame moved on meanwhile."""
        prompt_id = str(job.prompt_id)
        generation = self.ledger.requeue_job(job.name, generation=job.generation, prompt_id=prompt_id, counted=counted)
        if generation is None:
            return False
        self._recount_at = None
        if not self._tasks.put(Task(job.name, job.relpath, job.width, job.height, generation)):
            self._spilled = True  # the pending row is the task; a refill brings it back
        return True

    def idle(self) -> bool:
        """Nothing to send or record: no task in line or in flight, no result to apply, no pending row in the ledger."""
        if not self._tasks.empty() or not self._results.empty() or self._unapplied or self._waiting:
            return False
        return self.ledger.pending_upload_count() == 0

    def close(self) -> None:
        """Stop the HTTP thread (within one request timeout) and apply what it finished."""
        if not self._sender.stop(timeout=self.client.timeout + 1.0):
            logger.warning("the ComfyUI upload thread is still in a request; leaving it behind")
        if self._jobs is not None and not self._jobs.close(timeout=self.client.timeout + 1.0):
            logger.warning("the ComfyUI job check is still in a request; leaving it behind")
        try:
            self.pump()
        except SinkwatchError as exc:
            logger.error("could not record the last ComfyUI results ({}); they will be sent again", exc)

    def _refill(self) -> None:
        """Top the line up from the ledger's pending rows once it is down to half."""
        if not self._spilled or self._tasks.qsize() > self._tasks.limit // 2:
            return
        # Pending rows already in line or in flight come back too: ask for that many more than there is room.
        wanted = self._tasks.limit - self._tasks.qsize() + self._tasks.known()
        rows = self.ledger.pending_uploads(limit=wanted)
        left = self._tasks.offer(
            Task(u.name, u.relpath, u.width, u.height, u.generation, look_first=u.prompt_id is not None) for u in rows
        )
        self._spilled = len(rows) == wanted or left > 0  # else every pending row has been seen and taken

    def _count_pending(self) -> None:
        now = self.clock()
        if self._recount_at is not None and now < self._recount_at:
            return
        self.metrics.comfyui_pending_uploads.set(self.ledger.pending_upload_count())
        self._recount_at = now + RECOUNT_EVERY

    def _must_wait(self, result: Result) -> bool:
        name = result.task.name
        if any(held.task.name == name for held in self._waiting):
            return True  # results of one name apply in order
        return self.busy is not None and self._writes_sidecar(result) and self.busy(name)

    def _writes_sidecar(self, result: Result) -> bool:
        return result.kind in ("queued", "prompt_rejected") or (result.kind == "uploaded" and self.workflow is None)

    def _apply_waiting(self) -> int:
        """Apply the held-back results whose name no worker publishes any more, in order."""
        applied, kept, busy_names = 0, deque[Result](), set[str]()
        try:
            while self._waiting:
                result = self._waiting[0]
                name = result.task.name
                if name in busy_names or (self.busy is not None and self.busy(name)):
                    busy_names.add(name)
                    kept.append(self._waiting.popleft())
                    continue
                self._apply(result)
                self._waiting.popleft()
                applied += 1
        finally:
            kept.extend(self._waiting)
            self._waiting = kept
        return applied

    def _apply(self, result: Result) -> None:
        self._apply_kind(result)
        if result.applied is not None:
            result.applied.set()
        if is_final(result, workflow=self.workflow is not None):
            self._tasks.release(result.task)
            self._recount_at = None

    def _apply_kind(self, result: Result) -> None:
        task, kind = result.task, result.kind
        if kind in ("upload_retry", "prompt_retry"):
            counter = self.metrics.comfyui_uploads if kind == "upload_retry" else self.metrics.comfyui_prompts
            counter.labels(outcome="retried").inc()
            if result.prompt_id is not None:
                self.ledger.prompt_tried(task.name, generation=task.generation, prompt_id=result.prompt_id)
            self.status.failed(result.error, name=task.name, delay=result.delay)
            return
        if kind in ("uploaded", "queued", "prompt_rejected") or isinstance(result.error, ComfyRejected):
            # ComfyUI answered (a missing frame or a bad template says nothing about it).
            self.status.answered(self.ledger.pending_upload_count)
        if kind == "superseded":
            logger.bind(frame=task.name).debug("dropped the upload of an older {}: republished meanwhile", task.name)
        elif kind == "uploaded":
            if self.workflow is None:
                self._settle(result, {"upload": result.reference, "prompt_id": None})
            elif result.prompt_id is not None:
                self.ledger.prompt_tried(task.name, generation=task.generation, prompt_id=result.prompt_id)
            self.metrics.comfyui_uploads.labels(outcome="ok").inc()
        elif kind == "queued":
            settled = self._settle(result, {"upload": result.reference, "prompt_id": result.prompt_id})
            self.metrics.comfyui_prompts.labels(outcome="queued").inc()
            if settled and self._jobs is not None and result.prompt_id is not None:
                self._jobs.queued(result.prompt_id)
            if result.node_errors:
                logger.bind(frame=task.name, node_errors=dict(result.node_errors)).warning(
                    "ComfyUI queued the workflow for {} but dropped outputs with errors", task.name
                )
        elif kind == "upload_failed":
            self._fail(result, "comfyui_upload")
            if isinstance(result.error, FileNotFoundError):
                # Cleared or replaced in the queue before it could be sent: nobody's fault, nothing to fix.
                self.metrics.comfyui_uploads.labels(outcome="gone").inc()
                logger.bind(frame=task.name).warning("{} left the queue before it was sent to ComfyUI", task.name)
                return
            self.metrics.comfyui_uploads.labels(outcome="failed").inc()
            # A failure that is neither ComfyUI's answer nor the file system's is a bug: keep its traceback.
            known = isinstance(result.error, ComfyRejected | OSError)
            logger.bind(frame=task.name).opt(exception=None if known else result.error).error(
                "cannot upload {} to ComfyUI: {}", task.name, result.error
            )
        elif kind == "prompt_rejected":
            self._reject(result)
        else:
            self._fail(result, "workflow")
            self.metrics.comfyui_prompts.labels(outcome="failed").inc()
            logger.bind(frame=task.name).error("cannot queue the workflow for {}: {}", task.name, result.error)

    def _reject(self, result: Result) -> None:
        error = result.error
        lines = error.node_messages() if isinstance(error, ComfyRejected) else []
        self._note(result, {"upload": result.reference, "prompt_id": None, "prompt_error": [str(error), *lines]})
        self._fail(result, "comfyui_rejected")
        self.metrics.comfyui_prompts.labels(outcome="rejected").inc()
        logger.bind(frame=result.task.name, node_errors=lines).error(
            "ComfyUI rejected the workflow for {}: {}{}", result.task.name, error, "".join(f"\n  {x}" for x in lines)
        )

    def _settle(self, result: Result, note: dict[str, object]) -> bool:
        """Record the upload (and the workflow) as sent; False when a newer frame of the name superseded it."""
        # Sidecar first: a stop between the two leaves the upload pending, and sending it again rewrites both.
        self._note(result, note)
        logger.bind(frame=result.task.name).debug(
            "sent {} to ComfyUI as {} (prompt {})", result.task.name, result.reference, result.prompt_id
        )
        return self.ledger.upload_done(
            result.task.name,
            generation=result.task.generation,
            reference=str(result.reference),
            prompt_id=result.prompt_id,
        )

    def _fail(self, result: Result, reason: str) -> None:
        self.refused += 1
        self.ledger.upload_failed(
            result.task.name,
            generation=result.task.generation,
            reason=reason,
            message=str(result.error),
            reference=result.reference,
        )

    def _note(self, result: Result, note: dict[str, object]) -> None:
        # Only reached when no worker is publishing that name (see _must_wait).
        note_upload(self.publisher, self.metrics, result.task.name, frame_sha256=result.frame_sha256, note=note)
