"""ComfyClient's bounds: a whole request within its timeout, an answer within 1 MiB, whatever the server does.

The server here is a bare loopback socket that answers with exactly the bytes
a test scripts, at the pace it scripts: what a wedged proxy or a wrong URL can
send, and a well-behaved HTTP server would not.
"""

from __future__ import annotations

import io
import json
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from service.comfyui import ComfyClient
from service.comfyui_transport import MAX_REPLY
from service.errors import ComfyUnavailable

UPLOAD_ANSWER = json.dumps({"name": "a.png", "subfolder": "sinkwatch", "type": "input"}).encode()
HUGE = 64 << 20
# What the server waits for a client to hang up on a head declaring too much: it does so at once, this
# only has to outlast a loaded machine (and is spent only when the client is wrong and keeps listening).
HANG_UP_WITHIN = 5.0
SMALL_BUFFER = 32 << 10  # the kernel doubles what is asked for its bookkeeping

Script = Callable[["Peer", threading.Event], None]


class Peer:
    """The accepted connection, as a script sees it."""

    def __init__(self, conn: socket.socket, server: RawServer) -> None:
        self._conn = conn
        self._server = server

    def send(self, data: bytes) -> bool:
        """Send all of `data`; False once the client is gone."""
        try:
            self._conn.sendall(data)
        except OSError:
            return False
        self._server.sent += len(data)
        return True

    def hung_up(self, *, within: float) -> bool:
        """Whether the client closes its end within `within` seconds, the server sending nothing meanwhile."""
        timeout = self._conn.gettimeout()
        self._conn.settimeout(within)
        try:
            return self._conn.recv(1) == b""
        except TimeoutError:
            return False
        except OSError:  # reset: the client is gone just the same
            return True
        finally:
            self._conn.settimeout(timeout)


class RawServer:
    """Answers the first connection with `script(peer, stop)`.

    `send_buffer`: SO_SNDBUF of the accepted socket, so that little of what the server "sent" can wait in
    the kernel instead of being read; :attr:`send_buffer` is then what the kernel made of it.
    """

    def __init__(self, script: Script, *, send_buffer: int | None = None) -> None:
        self.script = script
        self.sent = 0
        self.send_buffer = 0
        self._wanted_send_buffer = send_buffer
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
                if self._wanted_send_buffer is not None:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._wanted_send_buffer)
                self.send_buffer = conn.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
                _read_request(conn)
                self.script(Peer(conn, self), self.stop)
            return


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

    def start(script: Script, **options: int) -> RawServer:
        servers.append(RawServer(script, **options))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def client_receive_buffers(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The client's sockets get a small, fixed SO_RCVBUF; the list gets each one's size as the kernel set it.

    Left alone, Linux grows a receive buffer as fast reads go on (up to tcp_rmem's maximum, often 6-32 MiB):
    then "the server could send N bytes" would say little about how many the client read.
    """
    sizes: list[int] = []
    create_connection = socket.create_connection

    def small_buffered(*args: Any, **kwargs: Any) -> socket.socket:
        sock = create_connection(*args, **kwargs)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
        sizes.append(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
        return sock

    monkeypatch.setattr(socket, "create_connection", small_buffered)
    return sizes


def trickle(data: bytes) -> Script:
    """A byte every 20 ms: each read returns long before any per-read timeout; the whole takes seconds."""

    def script(peer: Peer, stop: threading.Event) -> None:
        for index in range(len(data)):
            if stop.wait(0.02) or not peer.send(data[index : index + 1]):
                return

    return script


def head(*lines: str) -> bytes:
    return ("\r\n".join(("HTTP/1.1 200 OK", *lines)) + "\r\n\r\n").encode()


def stream_body(peer: Peer, stop: threading.Event, total: int) -> None:
    chunk = b"0" * (1 << 16)
    for _ in range(total // len(chunk)):
        if stop.is_set() or not peer.send(chunk):
            return


def test_a_server_trickling_its_headers_is_cut_off_at_the_request_deadline(serve: Callable[..., RawServer]) -> None:
    answer = head("Content-Type: application/json", "X-Padding: " + "x" * 200, f"Content-Length: {len(UPLOAD_ANSWER)}")
    server = serve(trickle(answer + UPLOAD_ANSWER))
    with pytest.raises(ComfyUnavailable, match=r"did not answer POST /upload/image within 0\.5s \(--comfyui-timeout\)"):
        ComfyClient(server.url, timeout=0.5).upload_image(b"png", name="a.png")
    assert server.sent < len(answer), "gave up while the headers were still coming"


def test_a_server_trickling_its_body_is_cut_off_at_the_request_deadline(serve: Callable[..., RawServer]) -> None:
    body = UPLOAD_ANSWER + b" " * 200  # JSON may end in blanks: complete, it would be a good answer
    answer = head("Content-Type: application/json", f"Content-Length: {len(body)}")
    server = serve(lambda peer, stop: peer.send(answer) and trickle(body)(peer, stop))
    with pytest.raises(ComfyUnavailable, match=r"did not answer POST /upload/image within 0\.5s"):
        ComfyClient(server.url, timeout=0.5).upload_image(b"png", name="a.png")
    assert server.sent < len(answer) + len(body)


def test_an_answer_declared_larger_than_the_cap_is_not_read(serve: Callable[..., RawServer]) -> None:
    declared = head("Content-Type: application/json", f"Content-Length: {HUGE}")
    hung_up: list[bool] = []

    def script(peer: Peer, stop: threading.Event) -> None:
        # The head alone: a client that knows from it the answer is too long hangs up without waiting for
        # the body. One that waits gets the body after all, and is found out by what it did, not by a hang.
        if peer.send(declared):
            hung_up.append(peer.hung_up(within=HANG_UP_WITHIN))
            if not hung_up[-1]:
                stream_body(peer, stop, HUGE)

    server = serve(script)
    with pytest.raises(ComfyUnavailable, match=f"over {MAX_REPLY} bytes") as caught:
        ComfyClient(server.url, timeout=10).upload_image(b"png", name="a.png")
    assert "check --comfyui-url" in str(caught.value)
    server.close()
    assert hung_up == [True], f"the client did not hang up within {HANG_UP_WITHIN:g}s of a head declaring {HUGE} bytes"
    assert server.sent == len(declared), f"{server.sent - len(declared)} bytes of the body were read"


def test_an_undeclared_answer_is_read_only_up_to_the_cap(
    serve: Callable[..., RawServer], client_receive_buffers: list[int]
) -> None:
    undeclared = head("Content-Type: application/json", "Connection: close")

    def script(peer: Peer, stop: threading.Event) -> None:
        if peer.send(undeclared):
            stream_body(peer, stop, HUGE)

    server = serve(script, send_buffer=SMALL_BUFFER)
    with pytest.raises(ComfyUnavailable, match=f"over {MAX_REPLY} bytes"):
        ComfyClient(server.url, timeout=10).history("some-id")
    server.close()
    # What the server got rid of beyond what the client read (the cap's worth and one byte, with
    # http.client's read-ahead) sat in a kernel buffer at either end when the client hung up.
    (receive_buffer,) = client_receive_buffers
    read_at_most = len(undeclared) + MAX_REPLY + 1 + io.DEFAULT_BUFFER_SIZE
    slack = receive_buffer + server.send_buffer
    assert server.sent <= read_at_most + slack, (
        f"the server got {server.sent} bytes away: more than the cap ({MAX_REPLY}) plus {slack} bytes of socket "
        "buffers, so the client read past the cap"
    )


def test_an_answer_cut_short_is_unavailable_not_a_truncated_success(serve: Callable[..., RawServer]) -> None:
    answer = head("Content-Type: application/json", f"Content-Length: {len(UPLOAD_ANSWER) + 100}") + UPLOAD_ANSWER
    server = serve(lambda peer, stop: peer.send(answer))
    with pytest.raises(ComfyUnavailable, match="unreachable"):
        ComfyClient(server.url, timeout=10).upload_image(b"png", name="a.png")


def test_an_answer_within_the_cap_and_the_deadline_is_read_whole(serve: Callable[..., RawServer]) -> None:
    body = UPLOAD_ANSWER + b" " * (MAX_REPLY - len(UPLOAD_ANSWER))  # exactly the cap
    server = serve(lambda peer, stop: peer.send(head(f"Content-Length: {len(body)}") + body))
    result = ComfyClient(server.url, timeout=10).upload_image(b"png", name="a.png")
    assert result.reference == "sinkwatch/a.png"
