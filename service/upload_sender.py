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

A workflow is queued under a ``prompt_id`` of sinkwatch's own, the same for
every try of one task (see :func:`prompt_id_for`), and written to the ledger
before the first try. A try that failed without a clear answer (a timeout, a
lost connection, a 5xx), or one a killed run never heard the answer of, may
have queued it all the same, so before trying again the sender asks ComfyUI
for that id, and takes a prompt it finds as queued rather than queueing the
video twice.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

from service.comfyui import ComfyClient, QueuedPrompt
from service.errors import ComfyRejected, ComfyUnavailable, SinkwatchError
from service.publish import Publisher
from service.retry import keep_trying
from service.upload_queue import Task, TaskQueue
from service.workflow import prepare

T = TypeVar("T")

# How often a wait for the main thread looks whether the sender is stopping (seconds).
_APPLY_POLL = 0.05
_PROMPT_IDS = uuid.UUID("5b0e3f1c-8f43-4d55-9a3e-2f6c1d7a9b20")  # the uuid5 namespace of sinkwatch's prompt ids

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
    # Set by the main thread once it has applied the result (see `Sender._send`).
    applied: threading.Event | None = None


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
        """Stop taking tasks, cut a backoff or a request short, wait up to ``timeout`` s; True if the thread ended.

        A request cut short leaves its task pending, to be sent at the next start; a workflow that ComfyUI may
        have queued meanwhile is looked up first then (its prompt_id is in the ledger before it is sent)."""
        self._stop.set()
        self.tasks.close()
        self.client.stop_requests()
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
            sha256 = hashlib.sha256(data).hexdigest()
            stored = self.client.upload_image(data, name=self._upload_name(frame, sha256))
            return stored.reference, sha256

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
        if self.workflow is None:
            self.results.put(uploaded)
            return
        # Every later result names what was sent, from `uploaded`.
        try:
            prompt = prepare(self.workflow, image=reference, width=task.width, height=task.height)
        except (SinkwatchError, ValueError) as exc:
            self.results.put(uploaded)
            self.results.put(replace(uploaded, kind="prompt_failed", error=exc))
            return

        prompt_id = prompt_id_for(prompt, generation=task.generation, frame_sha256=sha256)
        # The ledger learns the id before ComfyUI does: a run killed after ComfyUI queued the prompt, before the
        # answer was recorded, looks it up at its restart rather than queueing the video twice.
        uploaded = replace(uploaded, prompt_id=prompt_id, applied=threading.Event())
        self.results.put(uploaded)
        if not self._applied(uploaded):
            return  # stopping: the task stays pending
        tried = task.look_first

        def submit() -> QueuedPrompt | None:
            nonlocal tried
            if self.tasks.superseded(task):
                return None
            # A retry gets here with `tried` set (or a task whose earlier run failed so): the try before failed,
            # maybe after ComfyUI queued it.
            # (A ComfyUI too old to take a client's prompt_id queued it under another: not found, sent again.)
            found = self.client.find(prompt_id) if tried else None
            tried = True
            return found or self.client.submit(prompt, prompt_id=prompt_id)

        try:
            queued = self._retrying(task, "prompt_retry", submit, prompt_id=prompt_id)
        except ComfyRejected as exc:
            self.results.put(replace(uploaded, kind="prompt_rejected", error=exc))
            return
        if queued is None:
            self.results.put(replace(uploaded, kind="superseded"))
            return
        self.results.put(replace(uploaded, kind="queued", prompt_id=queued.prompt_id, node_errors=queued.node_errors))

    def _upload_name(self, frame: Path, sha256: str) -> str:
        """The frame's name in ComfyUI, where an upload overwrites its own earlier one (in its subfolder).

        With a workflow, each version of a frame gets a name of its own: a prompt loads its frame when it runs,
        maybe minutes after it was queued, and must find the one it was queued for, not a newer one.
        """
        if self.workflow is None:
            return frame.name
        return f"{frame.stem}-{sha256[:8]}{frame.suffix}"

    def _applied(self, result: Result) -> bool:
        """Wait until the main thread has applied `result`; False once stopping."""
        assert result.applied is not None
        while not result.applied.wait(_APPLY_POLL):
            if self._stop.is_set():
                return False
        return True

    def _retrying(self, task: Task, kind: Kind, call: Callable[[], T], *, prompt_id: str | None = None) -> T:
        """Call until ComfyUI answers, reporting each failure as a `kind` result (with the `prompt_id` a try
        may have queued); raises once stopping."""
        return keep_trying(
            call,
            transient=ComfyUnavailable,
            base=self.retry_base,
            cap=self.retry_cap,
            stop=self._stop,
            # A failure once stopping is a request cut short by the stop: no outage of ComfyUI.
            failed=lambda error, delay: (
                None
                if self._stop.is_set()
                else self.results.put(Result(task, kind, error=error, delay=delay, prompt_id=prompt_id))
            ),
        )


def prompt_id_for(prompt: Mapping[str, Any], *, generation: int, frame_sha256: str) -> str:
    """The ``prompt_id`` a task's workflow is queued under: the same for each try, another for anything else.

    The prompt names the uploaded frame (subfolder and name) and carries the template and the video size;
    the generation changes with each republication (a deliberate re-send); the frame's content tells apart
    frames of one name after a fresh ledger, whose generations start at 1 again.
    """
    seed = json.dumps([generation, frame_sha256, prompt], sort_keys=True, separators=(",", ":"))
    return str(uuid.uuid5(_PROMPT_IDS, seed))
