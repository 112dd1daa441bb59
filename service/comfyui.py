"""A small ComfyUI HTTP client: upload a frame, queue a workflow, poll its history.

Standard library only (``http.client``, see :mod:`service.comfyui_transport`;
the multipart body is built by hand). The routes and bodies follow ComfyUI's ``server.py``:

- ``POST /upload/image``: multipart ``image`` (the file), ``type`` (``input``),
  ``subfolder``, ``overwrite`` (``"true"``/``"1"``, anything else means no) ->
  ``{name, subfolder, type}``; a subfolder that leaves ``input/`` is a bare 400.
- ``POST /prompt``: ``{"prompt": {...API-format nodes...}, "client_id": ..., "prompt_id": ...}``
  -> ``{prompt_id, number, node_errors}``, or 400 ``{error, node_errors}``.
- ``GET /queue``: ``{queue_running: [...], queue_pending: [...]}``, each entry
  ``[number, prompt_id, prompt, extra_data, outputs_to_execute, ...]``.
- ``GET /history/{prompt_id}``: ``{}`` until the prompt finished, then
  ``{prompt_id: {prompt, outputs, status: {status_str, completed, messages}}}``.

Failures split in two: :class:`ComfyUnavailable` (refused, timed out, 5xx,
a redirect, a 4xx other than 400/413, not a ComfyUI answer: transient, try
again later) and :class:`ComfyRejected` (400, ComfyUI's own validation answer,
or 413, a frame over its upload size limit: sending the same request again
will not help; it carries ComfyUI's ``error`` and ``node_errors`` as fields).
Both live in :mod:`service.errors`. A 404 or 401/403 comes from something in
front of ComfyUI or from a wrong URL (ComfyUI's own routes answer neither to
these requests), and a redirect (http -> https, a moved path) is not followed:
a 301/302 would turn the ``POST`` into a ``GET``. Each is retried, with a
message that names the status, the redirect target and ``--comfyui-url``, so
nothing is dropped while the operator fixes the URL. The HTTP exchange itself,
with its whole-request deadline and reply size cap, is in
:mod:`service.comfyui_transport`.

When uploads overwrite: only inside a subfolder (default ``sinkwatch``). The
caller passes the published frame name, which the publisher keeps unique per
source, and nothing but this sinkwatch writes into its subfolder, so a name
there belongs to exactly one source. Overwriting makes an upload idempotent: a
retry after a lost answer, or a re-upload of a reprocessed source, replaces
that source's own file and keeps the name the ledger and sidecar recorded
(without it ComfyUI would store changed content as ``name (1).png``). At the
top level of ``input/`` (subfolder ``""``, so that the frames show in
LoadImage's list) the user's own uploads live too, so there sinkwatch uploads
with ``overwrite=false``: ComfyUI keeps an existing file of the same name and
stores the frame as ``name (1).png`` (the same content is answered with the
existing name), and the caller records the name ComfyUI answered
(:attr:`UploadResult.reference`). ComfyUI writes uploads in place (not
atomically), so a prompt that loads a frame at the very moment it is
re-uploaded could read a partial file; re-uploads are rare (a changed rule).
LoadImage takes ``subfolder/name``; files in a subfolder are not in its
dropdown, which keeps the user's list clean.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import re
import time
import urllib.parse
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from service.comfyui_transport import MAX_REPLY, Cutoff, Reply, exchange
from service.errors import ComfyPending, ComfyRejected, ComfyUnavailable, ConfigError

DEFAULT_SUBFOLDER = "sinkwatch"
# ComfyUI's own refusals: 400 (validation, with node_errors; a subfolder leaving input/) and 413 (upload too large).
REJECTED_STATUSES = (400, 413)
# /queue carries every waiting prompt whole (with the UI's workflow, when queued from the browser): a long
# queue of video prompts outgrows MAX_REPLY, and a lookup that cannot read it cannot tell.
MAX_QUEUE_REPLY = 32 << 20
# Left out of a quoted filename: aiohttp (ComfyUI's server) splits Content-Disposition on every ';' before
# it looks at quotes and mends only one, and a quoted-string cannot carry control or non-ASCII characters.
# The user:password@ of a URL, however malformed the rest ("host:8188" without http://, "http//...").
_CREDENTIALS = re.compile(r"^([^/@]*//)?[^/@]*@")
_NOT_IN_QUOTED_FILENAME = re.compile(r'[^\x20-\x7e]|[;"\\]')


@dataclass(frozen=True)
class UploadResult:
    """ComfyUI's answer to an upload: the stored name (it may differ from the one sent)."""

    name: str
    subfolder: str
    type: str

    @property
    def reference(self) -> str:
        """The value for a LoadImage node's ``image`` input: ``subfolder/name`` or ``name``."""
        return f"{self.subfolder.strip('/')}/{self.name}" if self.subfolder.strip("/") else self.name


@dataclass(frozen=True)
class QueuedPrompt:
    """ComfyUI's answer to ``POST /prompt``; ``node_errors`` lists outputs it dropped."""

    prompt_id: str
    number: float
    node_errors: Mapping[str, Any] = field(default_factory=dict)


class ComfyClient:
    """Talks to one ComfyUI server. Cheap to create; holds no connection between calls."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 10.0,
        client_id: str | None = None,
        subfolder: str = DEFAULT_SUBFOLDER,
    ) -> None:
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            shown = _CREDENTIALS.sub(r"\1", base_url)  # messages end up in logs
            raise ConfigError(f"ComfyUI URL must look like http://host:8188, got {shown!r}", stage="comfyui")
        if timeout <= 0:
            raise ConfigError(f"ComfyUI timeout must be positive, got {timeout}", stage="comfyui")
        # Credentials in the URL (a proxy with basic auth in front of ComfyUI) go in a header of every request,
        # and base_url, which messages and log lines show, is the URL without them.
        credentials, _at, host = parsed.netloc.rpartition("@")
        self.base_url = urllib.parse.urlunsplit(parsed._replace(netloc=host)).rstrip("/")
        self._authorization = _basic_auth(credentials) if credentials else None
        self.timeout = timeout
        self.client_id = client_id or f"sinkwatch-{uuid.uuid4().hex}"
        self.subfolder = checked_subfolder(subfolder)
        self.cutoff = Cutoff()  # `stop_requests`

    def stop_requests(self) -> None:
        """End the requests in progress at once, and refuse any later one (:class:`ComfyUnavailable`)."""
        self.cutoff.cut_all()

    def upload_image(
        self, data: bytes, *, name: str, subfolder: str | None = None, overwrite: bool | None = None
    ) -> UploadResult:
        """Store ``data`` as ``input/<subfolder>/<name>`` (subfolder: the client's unless given).

        ``overwrite`` defaults to "only inside a subfolder" (see the module docstring); ComfyUI may
        then store the frame under another name, which the answer carries.
        """
        if not name or name in (".", "..") or any(c in name for c in "/\\\x00"):
            raise ValueError(f"name must be a plain file name, got {name!r}")
        folder = self.subfolder if subfolder is None else subfolder
        if overwrite is None:
            overwrite = bool(folder.strip("/"))
        fields = {"type": "input", "subfolder": folder, "overwrite": "true" if overwrite else "false"}
        body, content_type = _multipart(fields, file_field="image", filename=name, data=data)
        answer = self._call("POST", "/upload/image", body=body, content_type=content_type)
        if not isinstance(answer, Mapping) or not isinstance(answer.get("name"), str):
            raise self._unexpected("/upload/image", answer)
        return UploadResult(
            name=answer["name"], subfolder=str(answer.get("subfolder") or ""), type=str(answer.get("type") or "input")
        )

    def submit(self, prompt: Mapping[str, Any], *, prompt_id: str | None = None) -> QueuedPrompt:
        """Queue an API-format workflow, under ``prompt_id`` if given; a 400 raises :class:`ComfyRejected`.

        ComfyUI honours a client's ``prompt_id`` (older versions pick their own: the answer says which).
        """
        request: dict[str, Any] = {"prompt": prompt, "client_id": self.client_id}
        if prompt_id is not None:
            request["prompt_id"] = prompt_id
        answer = self._call("POST", "/prompt", body=json.dumps(request).encode(), content_type="application/json")
        if not isinstance(answer, Mapping) or not isinstance(answer.get("prompt_id"), str):
            raise self._unexpected("/prompt", answer)
        node_errors = answer.get("node_errors")
        return QueuedPrompt(
            prompt_id=answer["prompt_id"],
            number=float(answer.get("number") or 0),
            node_errors=dict(node_errors) if isinstance(node_errors, Mapping) else {},
        )

    def queue_prompt(self, prompt: Mapping[str, Any]) -> str:
        """Queue an API-format workflow and return its ``prompt_id``."""
        return self.submit(prompt).prompt_id

    def find(self, prompt_id: str) -> QueuedPrompt | None:
        """The prompt ComfyUI holds under ``prompt_id`` (waiting, running or finished), or None."""
        # The queue first: a prompt finishing meanwhile is in the history when that is read next.
        running, pending = self._queue()
        found = next((e for e in [*running, *pending] if e[1] == prompt_id), None)
        if found is None:
            finished = self.history(prompt_id)
            found = finished.get("prompt") if finished is not None else None
        if not isinstance(found, list):
            return None
        number = found[0] if found and isinstance(found[0], int | float) else 0
        return QueuedPrompt(prompt_id=prompt_id, number=float(number))

    def queue_ids(self) -> tuple[set[str], set[str]]:
        """The ``prompt_id`` of each prompt running, and of each waiting (read before any history, see `find`)."""
        running, pending = self._queue()
        return {str(entry[1]) for entry in running}, {str(entry[1]) for entry in pending}

    def _queue(self) -> tuple[list[list[Any]], list[list[Any]]]:
        answer = self._call("GET", "/queue", max_reply=MAX_QUEUE_REPLY)
        if not isinstance(answer, Mapping):
            raise self._unexpected("/queue", answer)
        running, pending = (
            [entry for entry in answer.get(key) or [] if isinstance(entry, list) and len(entry) > 1]
            for key in ("queue_running", "queue_pending")
        )
        return running, pending

    def history(self, prompt_id: str) -> Mapping[str, Any] | None:
        """The finished prompt's history entry, or None while it is queued or running."""
        route = "/history/" + urllib.parse.quote(prompt_id, safe="")
        answer = self._call("GET", route)
        if not isinstance(answer, Mapping):
            raise self._unexpected(route, answer)
        entry = answer.get(prompt_id)
        return entry if isinstance(entry, Mapping) else None

    def wait(
        self,
        prompt_id: str,
        *,
        timeout: float,
        poll: float = 1.0,
        sleep: Callable[[float], object] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> str:
        """Poll the history until the prompt finished; return ``status_str`` ("success" or "error").

        Raises :class:`ComfyPending` when ``timeout`` seconds pass first.
        """
        deadline = clock() + timeout
        while True:
            entry = self.history(prompt_id)
            if entry is not None:
                return status_of(entry)
            remaining = deadline - clock()
            if remaining <= 0:
                raise ComfyPending(f"prompt {prompt_id} not finished after {timeout:g}s", stage="comfyui")
            sleep(min(poll, remaining))

    def _call(
        self,
        method: str,
        route: str,
        *,
        body: bytes | None = None,
        content_type: str | None = None,
        max_reply: int = MAX_REPLY,
    ) -> Any:
        url = self.base_url + route
        headers = {"Accept": "application/json"}
        if self._authorization is not None:
            headers["Authorization"] = self._authorization
        if content_type is not None:
            headers["Content-Type"] = content_type
        reply = exchange(
            method, url, body=body, headers=headers, timeout=self.timeout, max_reply=max_reply, cutoff=self.cutoff
        )
        if reply.status in REJECTED_STATUSES:
            raise _rejection(method, route, url, reply.status, reply.body)
        if not 200 <= reply.status < 300:
            raise self._unavailable(method, route, reply)
        if reply.truncated:
            message = f"not a ComfyUI answer from {route}: over {max_reply} bytes (check --comfyui-url)"
            raise ComfyUnavailable(message, url=url, status=reply.status)
        try:
            return json.loads(reply.body)
        except ValueError as error:
            raise self._unexpected(route, reply.body[:80]) from error

    def _unavailable(self, method: str, route: str, reply: Reply) -> ComfyUnavailable:
        url = self.base_url + route
        status = f"{reply.status} {reply.reason}".strip()
        answered = f"{self.base_url} answered {status} to {method} {route}"
        if 300 <= reply.status < 400:
            where = reply.headers.get("location", "nowhere")
            message = f"{answered}, a redirect to {where}; redirects are not followed: check --comfyui-url"
        elif reply.status >= 500 or reply.status in (408, 429):
            message = f"ComfyUI answered {reply.status} to {method} {route}"
        else:
            message = (
                f"{answered}, which ComfyUI itself does not answer (a wrong host or path prefix, "
                "or a proxy that wants credentials?): check --comfyui-url"
            )
        return ComfyUnavailable(message, url=url, status=reply.status)

    def _unexpected(self, route: str, answer: object) -> ComfyUnavailable:
        # Not what ComfyUI answers: a wrong URL or a proxy page. Transient, so nothing
        # is dropped while the operator fixes it; the message says what came back.
        return ComfyUnavailable(f"not a ComfyUI answer from {route}: {answer!r:.120}", url=self.base_url + route)


def status_of(entry: Mapping[str, Any]) -> str:
    """``status.status_str`` of a history entry; entries of ComfyUI versions before it existed count as success."""
    status = entry.get("status")
    if isinstance(status, Mapping) and isinstance(status.get("status_str"), str):
        return str(status["status_str"])
    return "success"


def interrupted(entry: Mapping[str, Any]) -> bool:
    """The prompt was stopped (ComfyUI's Cancel or ``/interrupt``): its status is "error", and no error it was."""
    return any(message[0] == "execution_interrupted" for message in _status_messages(entry))


def failure_of(entry: Mapping[str, Any]) -> str:
    """What a history entry says went wrong: its ``execution_error`` message, or "" when it says nothing."""
    for name, details in _status_messages(entry):
        if name == "execution_error" and isinstance(details, Mapping):
            kind, text = details.get("exception_type"), details.get("exception_message")
            where = details.get("node_type")
            said = ": ".join(str(part).strip() for part in (kind, text) if part)
            return f"{said} (in {where})" if where and said else said
    return ""


def _status_messages(entry: Mapping[str, Any]) -> list[list[Any]]:
    """The ``[event, details]`` pairs of a history entry's status (what the server sent while it ran)."""
    status = entry.get("status")
    messages = status.get("messages") if isinstance(status, Mapping) else None
    return [m for m in messages if isinstance(m, list) and len(m) == 2] if isinstance(messages, list) else []


def _rejection(method: str, route: str, url: str, status: int, payload: bytes) -> ComfyRejected:
    """The :class:`ComfyRejected` for a 4xx answer.

    ComfyUI's ``error`` and ``node_errors`` become its fields; a body that is not
    JSON (a bare 400, a proxy page) is kept as ``details``.
    """
    try:
        answer = json.loads(payload) if payload else None
    except ValueError:
        answer = None
    error_type = details = None
    comfy_message = ""
    node_errors: Mapping[str, Any] = {}
    if isinstance(answer, Mapping):
        error = answer.get("error")
        if isinstance(error, Mapping):
            error_type = error.get("type")
            comfy_message = str(error.get("message") or "")
            details = error.get("details")
        elif isinstance(error, str):
            comfy_message = error
        if isinstance(answer.get("node_errors"), Mapping):
            node_errors = answer["node_errors"]
    elif payload:
        details = payload[:500].decode("utf-8", "replace")
    message = f"ComfyUI rejected {method} {route} ({status})" + (f": {comfy_message}" if comfy_message else "")
    return ComfyRejected(
        message,
        url=url,
        status=status,
        error_type=str(error_type) if error_type is not None else None,
        details=str(details) if details else None,
        node_errors=node_errors,
    )


def _basic_auth(credentials: str) -> str:
    """The Authorization header of a URL's ``user:password`` (percent-encoded, as URLs carry them)."""
    user, _colon, password = credentials.partition(":")
    pair = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"
    return "Basic " + base64.b64encode(pair.encode()).decode("ascii")


def checked_subfolder(subfolder: str) -> str:
    """The subfolder of ComfyUI's input/ as ComfyUI names it ("" for its top level); ConfigError if it leaves it."""
    path = PurePosixPath(subfolder)
    if path.is_absolute() or ".." in path.parts or "\\" in subfolder or "\x00" in subfolder:
        raise ConfigError(f"ComfyUI upload subfolder must stay inside input/, got {subfolder!r}", stage="comfyui")
    return "" if str(path) == "." else str(path)


def _multipart(fields: Mapping[str, str], *, file_field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = f"sinkwatch-{uuid.uuid4().hex}"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
        for key, value in fields.items()
    ]
    # The real name goes in filename* (RFC 6266), which aiohttp and other current parsers prefer; filename=
    # carries a stand-in that any parser reads whole, for one that knows only the plain parameter.
    fallback = _NOT_IN_QUOTED_FILENAME.sub("_", filename)
    encoded = urllib.parse.quote(filename, safe="")
    disposition = f'form-data; name="{file_field}"; filename="{fallback}"; filename*=utf-8\'\'{encoded}'
    media_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\nContent-Type: {media_type}\r\n\r\n"
    body = b"".join(parts) + head.encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"
