"""The uploader's HTTP thread: takes tasks in line, sends each frame (and its workflow), reports back.

It does only the HTTP work: it reads the frame from the queue folder, uploads
it, queues the workflow, and puts what happened on a result queue for the main
thread (which owns the ledger, the sidecars, the metrics and the log). Every
task it takes ends in exactly one *final* result (see :func:`is_final`), after
any number of retry results.

While ComfyUI is down the task at the head is retried with capped exponential
backoff and the others wait behind it (knocking on a closed door with each of
them would only multiply the noise). Before each attempt it asks the line
whether a newer generation of the frame is known; if so it drops the task (a
``superseded`` result) and the newer one is sent in its turn, so a frame
republished while ComfyUI was down is sent once, with its newest size. A stop
event cuts any wait short.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar

from service.comfyui import ComfyClient, QueuedPrompt
from service.errors import ComfyRejected, ComfyUnavailable, SinkwatchError
from service.publish import Publisher
from service.retry import keep_trying
from service.upload_queue import Task, TaskQueue
from service.workflow import prepare

T = TypeVar("T")

Kind = Literal[
    "upload_retry",
    "uploaded",
    "upload_failed",
    "prompt_retry",
    "queued",
    "prompt_rejected",
    "prompt_failed",
    "superseded",
]


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


def is_final(result: Result, *, workflow: bool) -> bool:
    """The last result of its task: retries are not, nor is ``uploaded`` when a workflow is queued next."""
    if result.kind in ("upload_retry", "prompt_retry"):
        return False
    return not (result.kind == "uploaded" and workflow)


class Sender:
    def __init__(
        self,
        *,
        client: ComfyClient,
        publisher: Publisher,
        workflow: Mapping[str, Any] | None,
        tasks: TaskQueue,
        results: queue.Queue[Result],
        retry_base: float,
        retry_cap: float,
    ) -> None:
        self.client = client
        self.publisher = publisher
        self.workflow = workflow
        self.tasks = tasks
        self.results = results
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sinkwatch-comfyui", daemon=True)
        self._thread.start()

    def stop(self, *, timeout: float) -> bool:
        """Stop taking tasks, cut a backoff short, wait up to ``timeout`` s; True if the thread ended."""
        self._stop.set()
        self.tasks.close()
        self._thread.join(timeout=timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            task = self.tasks.take()
            if task is None or self._stop.is_set():
                return
            try:
                self._send(task)
            except ComfyUnavailable:
                return  # raised only when stopping cut a backoff short; the task stays pending
            except Exception as exc:  # a bug must cost one upload, never the thread
                self.results.put(Result(task, "upload_failed", error=exc))

    def _send(self, task: Task) -> None:
        frame = self.publisher.frame_path(task.name)

        def upload() -> tuple[str, str] | None:
            if self.tasks.superseded(task):
                return None
            data = frame.read_bytes()  # read at each try: a republished frame is sent as it is now
            stored = self.client.upload_image(data, name=frame.name)  # overwrites only in its own subfolder
            return stored.reference, hashlib.sha256(data).hexdigest()

        try:
            sent = self._retrying(task, "upload_retry", upload)
        except (OSError, ComfyRejected) as exc:
            self.results.put(Result(task, "upload_failed", error=exc))
            return
        if sent is None:
            self.results.put(Result(task, "superseded"))
            return
        reference, sha256 = sent
        uploaded = Result(task, "uploaded", reference=reference, frame_sha256=sha256)
        self.results.put(uploaded)
        if self.workflow is None:
            return
        # Every later result names what was sent, from `uploaded`.
        try:
            prompt = prepare(self.workflow, image=reference, width=task.width, height=task.height)
        except (SinkwatchError, ValueError) as exc:
            self.results.put(replace(uploaded, kind="prompt_failed", error=exc))
            return

        def submit() -> QueuedPrompt | None:
            return None if self.tasks.superseded(task) else self.client.submit(prompt)

        try:
            queued = self._retrying(task, "prompt_retry", submit)
        except ComfyRejected as exc:
            self.results.put(replace(uploaded, kind="prompt_rejected", error=exc))
            return
        if queued is None:
            self.results.put(replace(uploaded, kind="superseded"))
            return
        self.results.put(replace(uploaded, kind="queued", prompt_id=queued.prompt_id, node_errors=queued.node_errors))

    def _retrying(self, task: Task, kind: Kind, call: Callable[[], T]) -> T:
        """Call until ComfyUI answers, reporting each failure as a `kind` result; raises once stopping."""
        return keep_trying(
            call,
            transient=ComfyUnavailable,
            base=self.retry_base,
            cap=self.retry_cap,
            stop=self._stop,
            failed=lambda error, delay: self.results.put(Result(task, kind, error=error, delay=delay)),
        )
