"""Published frames to a remote ComfyUI: upload each one and, optionally, queue a workflow on it.

Two threads, one job each. The main thread (the daemon loop) owns the ledger,
the sidecars, the metrics and the log: :meth:`Uploads.enqueue` records an
upload as pending in the ledger *before* anything is sent, and
:meth:`Uploads.pump` applies finished results. One background thread does
only the HTTP work: it takes tasks in order, reads the frame from the queue
folder, uploads it, queues the workflow, and puts what happened on a result
queue. Local publishing never waits for it.

While ComfyUI is down the task at the head is retried with capped exponential
backoff and the others wait behind it (knocking on a closed door with each of
them would only multiply the noise). A stop event cuts any wait short, so
:meth:`Uploads.close` returns within one request timeout. Nothing is lost:
whatever has not been applied when the daemon stops is still pending in the
ledger and :meth:`Uploads.resume` sends it at the next start.

So a frame may reach ComfyUI twice (a stop after ComfyUI stored it but before
the ledger said so). That is harmless: uploads overwrite sinkwatch's own file
in its own subfolder (see service/comfyui.py), and an identical prompt queued
again is answered from ComfyUI's cache without running anything.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar

from loguru import logger

from service.comfyui import ComfyClient
from service.errors import ComfyRejected, ComfyUnavailable, PublishError, SinkwatchError
from service.ledger import Ledger
from service.metrics import Metrics
from service.publish import Publisher
from service.retry import keep_trying
from service.workflow import prepare

# First retry after 1 s, doubling up to 30 s: a ComfyUI that comes back is noticed within half a minute.
RETRY_BASE = 1.0
RETRY_CAP = 30.0

T = TypeVar("T")

Kind = Literal[
    "upload_retry", "uploaded", "upload_failed", "prompt_retry", "queued", "prompt_rejected", "prompt_failed"
]


@dataclass(frozen=True)
class Task:
    """One frame to send: its output name (stem), source key, video size and ledger generation."""

    name: str
    key: str
    width: int
    height: int
    generation: int


@dataclass(frozen=True)
class Result:
    """What the HTTP thread reports back to the main thread."""

    task: Task
    kind: Kind
    reference: str | None = None
    frame_sha256: str | None = None
    prompt_id: str | None = None
    node_errors: Mapping[str, Any] = field(default_factory=dict)
    error: BaseException | None = None
    delay: float = 0.0


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
    ) -> None:
        self.client = client
        self.ledger = ledger
        self.publisher = publisher
        self.metrics = metrics
        self.workflow = workflow
        self.clock = clock
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.down_since: float | None = None  # main thread's view: when ComfyUI stopped answering
        self._tasks: queue.Queue[Task | None] = queue.Queue()
        self._results: queue.Queue[Result] = queue.Queue()
        self._unapplied: deque[Result] = deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sinkwatch-comfyui", daemon=True)
        self._thread.start()

    @property
    def down(self) -> bool:
        return self.down_since is not None

    # -- main thread ----------------------------------------------------------

    def resume(self) -> int:
        """At start: send again every upload the ledger still has pending; returns how many."""
        pending = self.ledger.uploads("pending")
        for upload in pending:
            self._tasks.put(Task(upload.name, upload.relpath, upload.width, upload.height, upload.generation))
        if pending:
            logger.info("resuming {} uploads to ComfyUI at {} left pending", len(pending), self.client.base_url)
        return len(pending)

    def enqueue(self, name: str, key: str, width: int, height: int) -> None:
        """Owe ComfyUI the just-published frame `name` (ledger first), then hand it to the HTTP thread."""
        try:
            generation = self.ledger.upload_pending(name, relpath=key, width=width, height=height)
        except PublishError as exc:
            # The frame is published already; sending it still beats dropping it.
            logger.bind(frame=name).error(
                "cannot record the upload of {} ({}); it will not survive a restart", name, exc
            )
            generation = 0
        self._tasks.put(Task(name, key, width, height, generation))

    def pump(self) -> int:
        """Apply the results the HTTP thread has finished; returns how many.

        A result whose ledger write fails (disk full) stays first in line and
        is applied again by the next call, so the daemon may simply retry.
        """
        applied = 0
        while True:
            if not self._unapplied:
                try:
                    self._unapplied.append(self._results.get_nowait())
                except queue.Empty:
                    return applied
            self._apply(self._unapplied[0])
            self._unapplied.popleft()
            applied += 1

    def close(self) -> None:
        """Stop the HTTP thread (within one request timeout) and apply what it finished."""
        self._stop.set()
        self._tasks.put(None)
        self._thread.join(timeout=self.client.timeout + 1.0)
        if self._thread.is_alive():
            logger.warning("the ComfyUI upload thread is still in a request; leaving it behind")
        try:
            self.pump()
        except SinkwatchError as exc:
            logger.error("could not record the last ComfyUI results ({}); they will be sent again", exc)

    def _apply(self, result: Result) -> None:
        task, kind = result.task, result.kind
        if kind in ("upload_retry", "prompt_retry"):
            if kind == "upload_retry":
                self.metrics.comfyui_uploads.labels(outcome="retried").inc()
            self._went_down(result)
            return
        if kind in ("uploaded", "queued", "prompt_rejected") or isinstance(result.error, ComfyRejected):
            self._came_back()  # ComfyUI answered (a missing frame or a bad template says nothing about it)
        if kind == "uploaded":
            if self.workflow is None:
                self._settle(result, {"upload": result.reference, "prompt_id": None})
            self.metrics.comfyui_uploads.labels(outcome="ok").inc()
        elif kind == "queued":
            self._settle(result, {"upload": result.reference, "prompt_id": result.prompt_id})
            self.metrics.comfyui_prompts.labels(outcome="queued").inc()
            if result.node_errors:
                logger.bind(frame=task.name, node_errors=dict(result.node_errors)).warning(
                    "ComfyUI queued the workflow for {} but dropped outputs with errors", task.name
                )
        elif kind == "upload_failed":
            self._fail(result, "comfyui_upload")
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

    def _settle(self, result: Result, note: dict[str, object]) -> None:
        # Sidecar first: a stop between the two leaves the upload pending, and sending it again rewrites both.
        self._note(result, note)
        logger.bind(frame=result.task.name).debug(
            "sent {} to ComfyUI as {} (prompt {})", result.task.name, result.reference, result.prompt_id
        )
        self.ledger.upload_done(
            result.task.name,
            generation=result.task.generation,
            reference=str(result.reference),
            prompt_id=result.prompt_id,
        )

    def _fail(self, result: Result, reason: str) -> None:
        self.ledger.upload_failed(
            result.task.name,
            generation=result.task.generation,
            reason=reason,
            message=str(result.error),
            reference=result.reference,
        )

    def _note(self, result: Result, note: dict[str, object]) -> None:
        """Add ``{"comfyui": note}`` to the frame's sidecar, if it still describes the frame that was sent."""
        name = result.task.name
        path = self.publisher.sidecar_path(name)
        try:
            sidecar = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            logger.bind(frame=name).warning("cannot read the sidecar of {} to note the upload: {}", name, exc)
            return
        output = sidecar.get("output") if isinstance(sidecar, dict) else None
        if not isinstance(output, dict) or output.get("frame_sha256") != result.frame_sha256:
            # Republished meanwhile: the newer frame's own upload will note itself.
            logger.bind(frame=name).debug("sidecar of {} describes a newer frame; not noting the old upload", name)
            return
        sidecar["comfyui"] = note
        try:
            self.publisher.write_sidecar(name, sidecar)
        except PublishError as exc:
            self.metrics.record_publish_error(exc)
            logger.bind(frame=name).warning("cannot note the upload in the sidecar of {}: {}", name, exc)

    def _went_down(self, result: Result) -> None:
        if self.down_since is None:
            self.down_since = self.clock()
            logger.bind(url=self.client.base_url, reason=getattr(result.error, "reason", None)).warning(
                "ComfyUI is down ({}); uploads stay pending and are retried with backoff, frames keep publishing",
                result.error,
            )
        else:
            logger.debug("ComfyUI still down, retrying {} in {:.1f}s: {}", result.task.name, result.delay, result.error)

    def _came_back(self) -> None:
        if self.down_since is None:
            return
        seconds = self.clock() - self.down_since
        self.down_since = None
        logger.bind(url=self.client.base_url).info(
            "ComfyUI is back after {:.0f}s; sending {} pending uploads", seconds, self.ledger.upload_counts()["pending"]
        )

    # -- HTTP thread ----------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            task = self._tasks.get()
            if task is None or self._stop.is_set():
                return
            try:
                self._send(task)
            except ComfyUnavailable:
                return  # raised only when stopping cut a backoff short; the task stays pending
            except Exception as exc:  # a bug must cost one upload, never the thread
                self._results.put(Result(task, "upload_failed", error=exc))

    def _send(self, task: Task) -> None:
        frame = self.publisher.frame_path(task.name)

        def upload() -> tuple[str, str]:
            data = frame.read_bytes()  # read at each try: a republished frame is sent as it is now
            stored = self.client.upload_image(data, name=frame.name, overwrite=True)
            return stored.reference, hashlib.sha256(data).hexdigest()

        try:
            reference, sha256 = self._retrying(task, "upload_retry", upload)
        except (OSError, ComfyRejected) as exc:
            self._results.put(Result(task, "upload_failed", error=exc))
            return
        uploaded = Result(task, "uploaded", reference=reference, frame_sha256=sha256)
        self._results.put(uploaded)
        if self.workflow is None:
            return
        # Every later result names what was sent, from `uploaded`.
        try:
            prompt = prepare(self.workflow, image=reference, width=task.width, height=task.height)
        except (SinkwatchError, ValueError) as exc:
            self._results.put(replace(uploaded, kind="prompt_failed", error=exc))
            return
        try:
            queued = self._retrying(task, "prompt_retry", lambda: self.client.submit(prompt))
        except ComfyRejected as exc:
            self._results.put(replace(uploaded, kind="prompt_rejected", error=exc))
            return
        self._results.put(replace(uploaded, kind="queued", prompt_id=queued.prompt_id, node_errors=queued.node_errors))

    def _retrying(self, task: Task, kind: Kind, call: Callable[[], T]) -> T:
        """Call until ComfyUI answers, reporting each failure as a `kind` result; raises once stopping."""
        return keep_trying(
            call,
            transient=ComfyUnavailable,
            base=self.retry_base,
            cap=self.retry_cap,
            stop=self._stop,
            failed=lambda error, delay: self._results.put(Result(task, kind, error=error, delay=delay)),
        )
