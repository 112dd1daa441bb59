"""A loopback stand-in for ComfyUI's HTTP API, for tests.

It follows ComfyUI's ``server.py`` / ``execution.py`` where sinkwatch touches them:

- ``POST /upload/image`` (multipart ``image``, ``type``, ``subfolder``,
  ``overwrite``): reads each part's Content-Disposition the way aiohttp
  does (``filename*`` before ``filename``; a header it cannot parse leaves
  the part without a name, and ComfyUI answers 500), stores into the input
  folder it owns and answers ``{name, subfolder, type}``. Without
  ``overwrite`` ("true"/"1") an existing name with different content becomes
  ``name (1).ext`` (then ``(2)``...), the same content is answered with the
  existing name and not written again. A subfolder that leaves the folder
  (``../x``) is a bare 400.
- ``POST /prompt``: validates like ComfyUI (class_type present and known,
  required inputs, links, LoadImage's file must exist) and answers
  ``{prompt_id, number, node_errors}``, or 400 ``{error, node_errors}``.
  The client's ``prompt_id``, if any, is the prompt's id.
- ``GET /queue``: ``{queue_running, queue_pending}``, the prompts not yet
  done as ``[number, prompt_id, prompt, extra_data, outputs]`` (the first
  one runs).
- ``GET /history/{id}``: ``{}`` until the prompt is done, then
  ``{id: {prompt, outputs, status: {status_str, completed, messages}, meta}}``.
  A prompt is done after ``pending_polls`` history requests for it (time plays
  no part, so tests are deterministic); it runs at that moment.
- A prompt identical to the one run last (same nodes, same LoadImage file
  content) is cached: it executes nothing, writes no file and reports the
  earlier outputs. Any other prompt in between runs it again: ComfyUI's default
  cache keeps only the nodes of the prompt it runs (comfy_execution/caching.py,
  HierarchicalCache). (ComfyUI caches per node; whole-prompt caching is the
  part sinkwatch meets.)

Known nodes: LoadImage, SaveImage, PreviewImage, and WanImageToVideo (only
checked to exist: it carries the video size a prompt was queued with). Other
class types are refused the way ComfyUI refuses a node it does not have
(``missing_node_type``).

For the tests, beyond ComfyUI: ``fail_next`` (answer the next requests, or the
next ones on one route, with a status), ``answer_next`` (a raw status,
headers and body: a redirect, a proxy's page), ``stall``/``release`` (hold
requests unanswered), ``answer_prompts_late`` (queue a prompt, answer only
after the client gave up), ``run_queued`` (run waiting prompts now),
``interrupt`` (cancel the running one), ``restart`` (forget the queue and the
history, as a restarted ComfyUI has) and ``prompts`` (the prompts accepted, in
order).
"""

from __future__ import annotations

import contextlib
import email.message
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo

# class_type -> (required inputs, output node?)
NODES: dict[str, tuple[tuple[str, ...], bool]] = {
    "LoadImage": (("image",), False),
    "SaveImage": (("images", "filename_prefix"), True),
    "PreviewImage": (("images",), True),
    "WanImageToVideo": (("width", "height", "length"), False),
}
# aiohttp's token characters (aiohttp.helpers.TOKEN): printable ASCII but its separators.
_TOKEN = {chr(i) for i in range(33, 127)} - set('()<>@,;:\\"/[]?={}')


class FakeComfyUI:
    """Start with ``with FakeComfyUI() as comfy:``; ``comfy.url`` is the base URL."""

    def __init__(self, *, pending_polls: int = 1) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="fake-comfyui-"))
        self.input_dir = self.root / "input"
        self.output_dir = self.root / "output"
        self.temp_dir = self.root / "temp"
        for folder in (self.input_dir, self.output_dir, self.temp_dir):
            folder.mkdir()
        self.pending_polls = pending_polls
        self.requests: list[tuple[str, str]] = []
        self.prompts: list[dict[str, Any]] = []  # the API-format prompts accepted, in order
        self.errors: list[str] = []
        self.executions = 0
        self._lock = threading.Lock()
        self._number = 0
        self._pending: dict[str, dict[str, Any]] = {}
        self._history: dict[str, dict[str, Any]] = {}
        self._cache: dict[str, dict[str, Any]] = {}
        self._failures: list[tuple[int, str | None]] = []
        self._raw: list[tuple[int, dict[str, str], bytes]] = []
        self._stalling = False
        self._release = threading.Event()
        self._late: list[float] = []
        self._closing = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-comfyui", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        assert isinstance(host, str)  # the bound name is str; typeshed types it as any address bind() takes
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeComfyUI:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._closing.set()
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)

    def fail_next(self, status: int, *, count: int = 1, path: str | None = None) -> None:
        """Answer the next ``count`` requests (on ``path`` only, if given) with ``status`` instead of handling them."""
        with self._lock:
            self._failures.extend([(status, path)] * count)

    def answer_next(self, status: int, *, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        """Answer the next request with exactly this status, headers and body (say a redirect, or a proxy's page)."""
        with self._lock:
            self._raw.append((status, dict(headers or {}), body))

    def answer_prompts_late(self, seconds: float, *, count: int = 1) -> None:
        """Queue each of the next ``count`` accepted prompts at once but answer only ``seconds`` later."""
        with self._lock:
            self._late.extend([seconds] * count)

    def run_queued(self, count: int | None = None) -> None:
        """Run the first `count` waiting prompts now (all by default), in order, as ComfyUI's worker does."""
        with self._lock:
            for prompt_id, job in list(self._pending.items())[:count]:
                del self._pending[prompt_id]
                self._history[prompt_id] = self._run(job["record"])

    def interrupt(self) -> None:
        """Stop the running prompt as ComfyUI's Cancel does: into the history with status "error" and an
        ``execution_interrupted`` message (execution.py's handle_execution_error)."""
        with self._lock:
            prompt_id, job = next(iter(self._pending.items()))
            del self._pending[prompt_id]
            node_id, node = next(iter(job["record"][2].items()))
            details = {"prompt_id": prompt_id, "node_id": node_id, "node_type": node["class_type"], "executed": []}
            messages = [["execution_start", {"prompt_id": prompt_id}], ["execution_interrupted", details]]
            self._history[prompt_id] = {
                "prompt": job["record"],
                "outputs": {},
                "status": {"status_str": "error", "completed": False, "messages": messages},
                "meta": {},
            }

    def restart(self) -> None:
        """What a restart of ComfyUI does to what it holds in memory: the queue and the history are gone."""
        with self._lock:
            self._pending.clear()
            self._history.clear()
            self._cache.clear()

    def take_raw(self) -> tuple[int, dict[str, str], bytes] | None:
        with self._lock:
            return self._raw.pop(0) if self._raw else None

    def stall(self) -> None:
        """Hold every following request unanswered until :meth:`release` or close (a hung server)."""
        self._release.clear()
        self._stalling = True

    def release(self) -> None:
        """Answer the held requests and hold no more."""
        self._stalling = False
        self._release.set()

    def handle(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, object | None]:
        """One request -> (status, JSON payload or None for an empty body)."""
        self.requests.append((method, path))
        if self._stalling:
            self._release.wait(timeout=30)
        with self._lock:
            answer = self._route(method, path, headers, body)
            late = self._late.pop(0) if path == "/prompt" and answer[0] == 200 and self._late else 0.0
        self._closing.wait(late)  # the prompt is queued already; a client that gave up meanwhile never hears
        return answer

    def _route(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, object | None]:
        failure = next((f for f in self._failures if f[1] in (None, path)), None)
        if failure is not None:
            self._failures.remove(failure)
            return failure[0], {"error": "fake failure"}
        if method == "POST" and path == "/upload/image":
            return self._upload(headers.get("Content-Type", ""), body)
        if method == "POST" and path == "/prompt":
            return self._prompt(body)
        if method == "GET" and path == "/queue":
            records = [job["record"] for job in self._pending.values()]
            return 200, {"queue_running": records[:1], "queue_pending": records[1:]}
        if method == "GET" and path.startswith("/history/"):
            return self._history_of(urllib.parse.unquote(path.removeprefix("/history/")))
        return 404, None

    def _upload(self, content_type: str, body: bytes) -> tuple[int, object | None]:
        form = _parse_multipart(content_type, body)
        if form is None:
            return 500, None  # aiohttp: "Multipart field missing name."
        filename, data = form.get("image", (None, b""))
        if not filename:
            return 400, None
        kind = form.get("type", (None, b"input"))[1].decode() or "input"
        folders = {"input": self.input_dir, "temp": self.temp_dir, "output": self.output_dir}
        if kind not in folders:
            return 500, None  # ComfyUI's get_dir_by_type leaves the folder unset: a 500
        upload_dir = str(folders[kind])
        subfolder = form.get("subfolder", (None, b""))[1].decode()
        full_folder = os.path.join(upload_dir, os.path.normpath(subfolder))
        filepath = os.path.abspath(os.path.join(full_folder, filename))
        if os.path.commonpath((upload_dir, filepath)) != upload_dir:
            return 400, None
        os.makedirs(full_folder, exist_ok=True)
        overwrite = form.get("overwrite", (None, b""))[1].decode() in ("true", "1")
        stem, ext = os.path.splitext(filename)
        duplicate = False
        counter = 1
        while not overwrite and os.path.exists(filepath):
            if Path(filepath).read_bytes() == data:
                duplicate = True
                break
            filename = f"{stem} ({counter}){ext}"
            filepath = os.path.join(full_folder, filename)
            counter += 1
        if not duplicate:
            Path(filepath).write_bytes(data)
        return 200, {"name": filename, "subfolder": subfolder, "type": kind}

    def _prompt(self, body: bytes) -> tuple[int, object | None]:
        request = json.loads(body or b"{}")
        prompt = request.get("prompt")
        if not isinstance(prompt, dict):
            return 400, {"error": _error("no_prompt", "No prompt provided", ""), "node_errors": {}}
        error, node_errors, outputs = self._validate(prompt)
        if error is not None:
            return 400, {"error": error, "node_errors": node_errors}
        number = self._number
        self._number += 1
        prompt_id = str(request.get("prompt_id", uuid.uuid4()))
        extra = {"client_id": request["client_id"]} if "client_id" in request else {}
        self._pending[prompt_id] = {"polls": 0, "record": [number, prompt_id, prompt, extra, outputs]}
        self.prompts.append(prompt)
        return 200, {"prompt_id": prompt_id, "number": number, "node_errors": node_errors}

    def _validate(self, prompt: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any], list[str]]:
        for node_id, node in prompt.items():
            if not isinstance(node, dict) or "class_type" not in node:
                return _error("missing_node_type", f"Node 'ID #{node_id}' has no class_type.", ""), {}, []
            if node["class_type"] not in NODES:
                message = f"Node '{node['class_type']}' not found. The custom node may not be installed."
                return _error("missing_node_type", message, f"Node ID '#{node_id}'"), {}, []
        outputs = [node_id for node_id, node in prompt.items() if NODES[node["class_type"]][1]]
        if not outputs:
            return _error("prompt_no_outputs", "Prompt has no outputs", ""), {}, []
        node_errors: dict[str, Any] = {}
        good = []
        for output in outputs:
            failed = self._node_errors(prompt, output, set())
            for node_id, errors in failed.items():
                entry = node_errors.setdefault(
                    node_id, {"errors": errors, "dependent_outputs": [], "class_type": prompt[node_id]["class_type"]}
                )
                entry["dependent_outputs"].append(output)
            if not failed:
                good.append(output)
        if not good:
            details = "\n".join(
                f"{e['message']}: {e['details']}" for entry in node_errors.values() for e in entry["errors"]
            )
            error = _error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details)
            return error, node_errors, []
        return None, node_errors, good

    def _node_errors(self, prompt: dict[str, Any], node_id: str, seen: set[str]) -> dict[str, list[dict[str, Any]]]:
        if node_id in seen:
            return {}
        seen.add(node_id)
        node = prompt[node_id]
        inputs = node.get("inputs") or {}
        found: dict[str, list[dict[str, Any]]] = {}
        errors = []
        for name in NODES[node["class_type"]][0]:
            value = inputs.get(name)
            if value is None:
                errors.append(_error("required_input_missing", "Required input is missing", name, input_name=name))
            elif isinstance(value, list):
                if len(value) != 2 or str(value[0]) not in prompt:
                    errors.append(_error("bad_linked_input", "Bad linked input", f"{name}, {value}", input_name=name))
                else:
                    found.update(self._node_errors(prompt, str(value[0]), seen))
            elif node["class_type"] == "LoadImage" and self._input_file(str(value)) is None:
                details = f"image - Invalid image file: {value}"
                errors.append(
                    _error("custom_validation_failed", "Custom validation failed for node", details, input_name=name)
                )
        if errors:
            found[node_id] = errors
        return found

    def _input_file(self, name: str) -> Path | None:
        name = re.sub(r" \[(input|output|temp)\]$", "", name)
        path = (self.input_dir / name).resolve()
        inside = path.is_relative_to(self.input_dir.resolve())
        return path if inside and path.is_file() else None

    def _history_of(self, prompt_id: str) -> tuple[int, object | None]:
        job = self._pending.get(prompt_id)
        if job is not None:
            job["polls"] += 1
            if job["polls"] > self.pending_polls:
                del self._pending[prompt_id]
                self._history[prompt_id] = self._run(job["record"])
        entry = self._history.get(prompt_id)
        return 200, ({prompt_id: entry} if entry is not None else {})

    def _run(self, record: list[Any]) -> dict[str, Any]:
        prompt_id, prompt = record[1], record[2]
        messages: list[list[Any]] = [["execution_start", {"prompt_id": prompt_id}]]
        key = self._cache_key(prompt)
        self._cache = {key: self._cache[key]} if key in self._cache else {}  # what the prompt does not use goes
        outputs: dict[str, Any] = {}
        status = "success"
        if key in self._cache:
            messages.append(["execution_cached", {"nodes": list(prompt), "prompt_id": prompt_id}])
            outputs = json.loads(json.dumps(self._cache[key]))
        else:
            messages.append(["execution_cached", {"nodes": [], "prompt_id": prompt_id}])
            self.executions += 1
            try:
                outputs = self._execute(prompt)
                self._cache[key] = outputs
            except _NodeFailed as failure:
                status = "error"
                messages.append(["execution_error", failure.message(prompt_id)])
        if status == "success":
            messages.append(["execution_success", {"prompt_id": prompt_id}])
        meta = {
            node_id: {"node_id": node_id, "display_node": node_id, "parent_node": None, "real_node_id": node_id}
            for node_id in outputs
        }
        return {
            "prompt": record,
            "outputs": outputs,
            "status": {"status_str": status, "completed": status == "success", "messages": messages},
            "meta": meta,
        }

    def _cache_key(self, prompt: dict[str, Any]) -> str:
        digest = hashlib.sha256(json.dumps(prompt, sort_keys=True).encode())
        for node in prompt.values():
            if node["class_type"] == "LoadImage":
                path = self._input_file(str(node["inputs"]["image"]))
                digest.update(hashlib.sha256(path.read_bytes()).digest() if path else b"-")
        return digest.hexdigest()

    def _execute(self, prompt: dict[str, Any]) -> dict[str, Any]:
        images: dict[str, Image.Image] = {}
        outputs: dict[str, Any] = {}
        for node_id, node in prompt.items():
            if node["class_type"] == "LoadImage":
                path = self._input_file(str(node["inputs"]["image"]))
                try:
                    with Image.open(path or "") as opened:
                        images[node_id] = ImageOps.exif_transpose(opened).convert("RGB")
                except Exception as error:
                    raise _NodeFailed(node_id, node["class_type"], error) from error
        for node_id, node in prompt.items():
            if NODES[node["class_type"]][1]:
                source = images[str(node["inputs"]["images"][0])]
                prefix = node["inputs"].get("filename_prefix", "ComfyUI")
                folder_type = "output" if node["class_type"] == "SaveImage" else "temp"
                outputs[node_id] = {"images": [self._save(source, prefix, prompt, folder_type)]}
        return outputs

    def _save(self, image: Image.Image, prefix: str, prompt: dict[str, Any], folder_type: str) -> dict[str, str]:
        subfolder, _, stem = prefix.rpartition("/")
        folder = (self.output_dir if folder_type == "output" else self.temp_dir) / subfolder
        folder.mkdir(parents=True, exist_ok=True)
        pattern = re.compile(rf"^{re.escape(stem)}_(\d+)_")
        counters = [int(m.group(1)) for f in os.listdir(folder) if (m := pattern.match(f))]
        filename = f"{stem}_{max(counters, default=0) + 1:05}_.png"
        info = PngInfo()
        info.add_text("prompt", json.dumps(prompt))
        image.save(folder / filename, pnginfo=info, compress_level=4)
        return {"filename": filename, "subfolder": subfolder, "type": folder_type}


class _NodeFailed(Exception):
    def __init__(self, node_id: str, class_type: str, error: Exception) -> None:
        super().__init__(str(error))
        self.node_id, self.class_type, self.error = node_id, class_type, error

    def message(self, prompt_id: str) -> dict[str, Any]:
        return {
            "prompt_id": prompt_id,
            "node_id": self.node_id,
            "node_type": self.class_type,
            "executed": [],
            "exception_message": str(self.error),
            "exception_type": type(self.error).__name__,
            "traceback": [],
            "current_inputs": {},
            "current_outputs": {},
        }


def _error(kind: str, message: str, details: str, **extra_info: Any) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra_info}


def _parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]] | None:
    """Form fields by name -> (filename or None, raw bytes), byte-exact; None for a part aiohttp finds no name in."""
    header = email.message.Message()
    header["Content-Type"] = content_type
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str):
        return {}
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in body.split(b"--" + boundary.encode())[1:]:
        if part.startswith(b"--"):
            break
        head, _, data = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        lines = head.decode("utf-8", "surrogateescape").split("\r\n")  # aiohttp decodes part headers as UTF-8
        disposition = next(
            (v for n, _, v in (x.partition(":") for x in lines) if n.lower() == "content-disposition"), ""
        )
        params = _content_disposition(disposition.strip())
        if params is None or "name" not in params:
            return None
        filename = params.get("filename*", params.get("filename"))
        fields[params["name"]] = (filename, data.removesuffix(b"\r\n"))
    return fields


def _content_disposition(header: str) -> dict[str, str] | None:
    """The parameters of a Content-Disposition as aiohttp's parse_content_disposition reads them; None if it fails.

    It splits the header on every ';', quoted or not, and joins back only one ';' in a quoted value: a
    quoted filename holding two or more fails the whole header. An ``x*`` parameter is RFC 5987
    (``charset'lang'percent-encoded``); one that is not well formed is dropped.
    """
    kind, *items = header.split(";")
    if not _is_token(kind.strip()):
        return None
    params: dict[str, str] = {}
    while items:
        item = items.pop(0)
        if not item:
            continue
        if "=" not in item:
            return None
        key, value = item.split("=", 1)
        key, value = key.lower().strip(), value.lstrip()
        if key in params:
            return None
        if not _is_token(key):
            continue
        if key.endswith("*"):
            if not _is_token(value) or value.count("'") != 2:
                continue
            charset, _, encoded = value.split("'", 2)
            with contextlib.suppress(LookupError, UnicodeDecodeError):  # aiohttp drops it, as not well formed
                params[key] = urllib.parse.unquote(encoded, charset or "utf-8", "strict")
            continue
        if _is_token(value):
            params[key] = value
            continue
        quoted = value.rstrip()
        if not _is_quoted(quoted) and items and _is_quoted(f"{value};{items[0]}"):
            quoted = f"{value};{items.pop(0)}"
        if not _is_quoted(quoted):
            return None
        params[key] = re.sub(r"\\([\x00-\x7f])", r"\1", quoted[1:-1].lstrip("\\/"))
    return params


def _is_token(text: str) -> bool:
    return bool(text) and set(text) <= _TOKEN


def _is_quoted(text: str) -> bool:
    return len(text) >= 2 and text[0] == text[-1] == '"'


class _Server(ThreadingHTTPServer):
    # Join handler threads on close so no test leaks one.
    daemon_threads = False
    block_on_close = True
    fake: FakeComfyUI

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, ConnectionError):  # a client that gave up (timeout test) is expected
            self.fake.errors.append(repr(error))


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        raw = self.server.fake.take_raw()
        if raw is not None:
            self.server.fake.requests.append((self.command, self.path))
            self._send(*raw)
            return
        status, payload = self.server.fake.handle(self.command, self.path, self.headers, body)
        data = json.dumps(payload).encode() if payload is not None else b""
        self.send_response(status)
        if payload is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read ``FakeComfyUI.requests`` instead."""
