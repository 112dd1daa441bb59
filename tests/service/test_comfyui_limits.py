"""ComfyClient's bounds: a whole request within its timeout, an answer within 1 MiB, whatever the server does.

The server here is a bare loopback socket that answers with exactly the bytes
a test scripts, at the pace it scripts: what a wedged proxy or a wrong URL can
send, and a well-behaved HTTP server would not.
"""

from __future__ import annotations

import functools
import json
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from service.comfyui import ComfyClient
from service.comfyui_transport import MAX_REPLY
from service.errors import ComfyUnavailable

UPLOAD_ANSWER = json.dumps({"name": "a.png", "subfolder": "sinkwatch", "type": "input"}).encode()
HUGE = 64 << 20


class RawServer:
    """Answers the first connection with `script(send)`; `send` returns False once the client is gone."""

    def __init__(self, script: Callable[[Callable[[bytes], bool], threading.Event], None]) -> None:
        self.script = script
        self.sent = 0
        self.stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)  # the accept loop looks at `stop` this often
        self._thread = threading.Thread(target=self._serve, name="raw-http-server")
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def close(self) -> None:
        self.stop.set()
        self._thread.join(timeout=30)
        self._listener.close()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(10)
                _read_request(conn)
                self.script(functools.partial(self._send, conn), self.stop)
            return

    def _send(self, conn: socket.socket, data: bytes) -> bool:
        try:
            conn.sendall(data)
        except OSError:
            return False
        self.sent += len(data)
        return True


def _read_request(conn: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0
    )
    while len(body) < length:
        body += conn.recv(65536)


@pytest.fixture
def serve() -> Iterator[Callable[..., RawServer]]:
    servers: list[RawServer] = []

    def start(script: Callable[[Callable[[bytes], bool], threading.Event], None]) -> RawServer:
        servers.append(RawServer(script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def trickle(data: bytes) -> Callable[[Callable[[bytes], bool], threading.Event], None]:
    """A byte every 20 ms: each read returns long before any per-read timeout; the whole takes seconds."""

    def script(send: Callable[[bytes], bool], stop: threading.Event) -> None:
        for index in range(len(data)):
            if stop.wait(0.02) or not send(data[index : index + 1]):
                return

    return script


def head(*lines: str) -> bytes:
    return ("\r\n".join(("HTTP/1.1 200 OK", *lines)) + "\r\n\r\n").encode()


def stream(total: int, *lines: str) -> Callable[[Callable[[bytes], bool], threading.Event], None]:
    def script(send: Callable[[bytes], bool], stop: threading.Event) -> None:
        if not send(head(*lines)):
            return
        chunk = b"0" * (1 << 16)
        for _ in range(total // len(chunk)):
            if stop.is_set() or not send(chunk):
                return

    return script


def test_a_server_trickling_its_headers_is_cut_off_at_the_request_deadline(serve: Callable[..., RawServer]) -> None:
    answer = head("Content-Type: application/json", "X-Padding: " + "x" * 200, f"Content-Length: {len(UPLOAD_ANSWER)}")
    server = serve(trickle(answer + UPLOAD_ANSWER))
    with pytest.raises(ComfyUnavailable, match=r"did not answer POST /upload/image within 0\.5s \(--comfyui-timeout\)"):
        ComfyClient(server.url, timeout=0.5).upload_image(b"png", name="a.png")
    assert server.sent < len(answer), "gave up while the headers were still coming"


def test_a_server_trickling_its_body_is_cut_off_at_the_request_deadline(serve: Callable[..., RawServer]) -> None:
    body = UPLOAD_ANSWER + b" " * 200  # JSON may end in blanks: complete, it would be a good answer
    answer = head("Content-Type: application/json", f"Content-Length: {len(body)}")
    server = serve(lambda send, stop: send(answer) and trickle(body)(send, stop))
    with pytest.raises(ComfyUnavailable, match=r"did not answer POST /upload/image within 0\.5s"):
        ComfyClient(server.url, timeout=0.5).upload_image(b"png", name="a.png")
    assert server.sent < len(answer) + len(body)


def test_an_answer_declared_larger_than_the_cap_is_not_read(serve: Callable[..., RawServer]) -> None:
    server = serve(stream(HUGE, "Content-Type: application/json", f"Content-Length: {HUGE}"))
    with pytest.raises(ComfyUnavailable, match=f"over {MAX_REPLY} bytes") as caught:
        ComfyClient(server.url, timeout=10).upload_image(b"png", name="a.png")
    assert "check --comfyui-url" in str(caught.value)
    server.close()
    assert server.sent < HUGE, "the client hung up instead of reading it all"


def test_an_undeclared_answer_is_read_only_up_to_the_cap(serve: Callable[..., RawServer]) -> None:
    server = serve(stream(HUGE, "Content-Type: application/json", "Connection: close"))
    with pytest.raises(ComfyUnavailable, match=f"over {MAX_REPLY} bytes"):
        ComfyClient(server.url, timeout=10).history("some-id")
    server.close()
    assert server.sent < HUGE


def test_an_answer_cut_short_is_unavailable_not_a_truncated_success(serve: Callable[..., RawServer]) -> None:
    answer = head("Content-Type: application/json", f"Content-Length: {len(UPLOAD_ANSWER) + 100}") + UPLOAD_ANSWER
    server = serve(lambda send, stop: send(answer))
    with pytest.raises(ComfyUnavailable, match="unreachable"):
        ComfyClient(server.url, timeout=10).upload_image(b"png", name="a.png")


def test_an_answer_within_the_cap_and_the_deadline_is_read_whole(serve: Callable[..., RawServer]) -> None:
    body = UPLOAD_ANSWER + b" " * (MAX_REPLY - len(UPLOAD_ANSWER))  # exactly the cap
    server = serve(lambda send, stop: send(head(f"Content-Length: {len(body)}") + body))
    result = ComfyClient(server.url, timeout=10).upload_image(b"png", name="a.png")
    assert result.reference == "sinkwatch/a.png"
