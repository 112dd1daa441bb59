"""One HTTP exchange with ComfyUI, bounded in time and in size.

Why not ``urllib.request``: its timeout applies to each socket operation, so a
server that trickles a byte a second (a wedged proxy, a half-dead ComfyUI)
holds a request forever; it reads a whole reply into memory whatever its size;
and it follows redirects, turning a ``POST`` into a ``GET`` on a 301/302.
Here ``http.client`` does one request on a fresh connection, nothing follows a
redirect (the caller sees the 3xx), no proxy from the environment is used
(ComfyUI lives on loopback or the LAN, where a corporate ``http_proxy`` would
only swallow the requests), and:

- a deadline covers the whole exchange once connected: the TLS handshake,
  sending, the status line and headers, the body. When it passes, a timer
  shuts the socket down, which wakes the blocked read or write at once.
  Connecting is one socket operation with the same timeout;
- a reply body is read in chunks up to ``max_reply`` bytes; the rest of a
  longer one is left unread (:attr:`Reply.truncated`: not ComfyUI's JSON).

A passed deadline, like a refused connection, is :class:`ComfyUnavailable`:
the request may succeed later. (Name resolution is the one step no timeout
covers: ``getaddrinfo`` blocks in C, and a name with several addresses gets a
connect timeout for each. Use an IP address where that matters.)
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

from service.errors import ComfyUnavailable

MAX_REPLY = 1 << 20  # ComfyUI's JSON answers are a few KiB; a history entry with a big workflow well under 1 MiB
_CHUNK = 1 << 16


@dataclass(frozen=True)
class Reply:
    """An HTTP answer: status, headers (names lower-cased), and its body up to ``max_reply`` bytes.

    ``truncated``: the body was longer and only its start (possibly nothing) was read.
    """

    status: int
    reason: str
    headers: Mapping[str, str]
    body: bytes
    truncated: bool = False


def exchange(
    method: str,
    url: str,
    *,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float,
    max_reply: int = MAX_REPLY,
    cutoff: Cutoff | None = None,
) -> Reply:
    """Send one request and read its whole answer within ``timeout`` seconds, whatever the status; ``cutoff``
    may end it sooner."""
    parts = urllib.parse.urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    guard = _Deadline()
    if cutoff is not None:
        cutoff.join(guard)
    connection = _connection(parts, timeout=timeout, guard=guard)
    timer = threading.Timer(timeout, guard.expire)
    timer.name, timer.daemon = "sinkwatch-comfyui-deadline", True
    timer.start()
    try:
        connection.request(method, path, body=body, headers=dict(headers or {}))
        response = connection.getresponse()
        data, truncated = _read_capped(response, max_reply=max_reply)
        if guard.expired:
            raise TimeoutError  # the shutdown may read as an early end of the body: not an answer
        headers_in = {name.lower(): value for name, value in response.getheaders()}
        return Reply(response.status, response.reason, headers_in, data, truncated)
    except Exception as error:
        if cutoff is not None and cutoff.cut:
            raise ComfyUnavailable(f"{method} {path} cut short: sinkwatch is stopping", url=url) from error
        if guard.expired or isinstance(error, TimeoutError):
            # Whatever the shutdown made the read or write raise, the cause is the deadline; a socket
            # operation timing out (connecting, or a read racing the timer) means the same.
            message = f"ComfyUI did not answer {method} {path} within {timeout:g}s (--comfyui-timeout)"
            raise ComfyUnavailable(message, url=url) from error
        if isinstance(error, OSError | http.client.HTTPException):
            why = error.strerror if isinstance(error, OSError) and error.strerror else error
            raise ComfyUnavailable(f"ComfyUI at {parts.scheme}://{parts.netloc} unreachable: {why}", url=url) from error
        raise
    finally:
        if cutoff is not None:
            cutoff.leave(guard)
        guard.disarm()
        timer.cancel()
        timer.join()
        connection.close()


class Cutoff:
    """Ends the exchanges in progress at once, and any begun after: a stopping daemon does not wait out a
    request whose answer it would not use (what it was for stays owed, and is sent again at the next start)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._guards: set[_Deadline] = set()
        self.cut = False

    def cut_all(self) -> None:
        with self._lock:
            self.cut = True
            for guard in self._guards:
                guard.expire()

    def join(self, guard: _Deadline) -> None:
        with self._lock:
            self._guards.add(guard)
            if self.cut:
                guard.expire()

    def leave(self, guard: _Deadline) -> None:
        with self._lock:
            self._guards.discard(guard)


class _Deadline:
    """Shuts a connection's socket down once expired; attached as soon as the socket exists.

    It keeps a descriptor of its own for the socket (a dup): TLS moves the socket to a new object on the same
    descriptor, http.client closes its objects when it likes, and a descriptor closed under a timer could be
    reused by any file the process opens next. Shutting down the dup shuts down the one socket.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._armed = True
        self.expired = False

    def attach(self, sock: socket.socket) -> None:
        with self._lock:
            self._fd = os.dup(sock.fileno())
            if self.expired:
                self._shutdown()

    def expire(self) -> None:
        with self._lock:
            if not self._armed:
                return
            self.expired = True
            self._shutdown()

    def disarm(self) -> None:
        with self._lock:
            self._armed = False
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _shutdown(self) -> None:
        if self._fd is None:
            return  # not connected yet: attach shuts it down as soon as it is
        # SHUT_RDWR wakes a read or write blocked in the request's thread at once (a close would not).
        sock = socket.socket(fileno=self._fd)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the peer is gone already: the read or write fails on its own
        finally:
            sock.detach()


def _connection(parts: urllib.parse.SplitResult, *, timeout: float, guard: _Deadline) -> http.client.HTTPConnection:
    host = parts.hostname or ""
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(
            host, parts.port, timeout=timeout, context=ssl.create_default_context()
        )
    else:
        connection = http.client.HTTPConnection(host, parts.port, timeout=timeout)

    def create_connection(
        address: tuple[str, int], timeout: float | None = None, source_address: tuple[str, int] | None = None
    ) -> socket.socket:
        # Connecting is one socket operation, bounded by `timeout`; from here on the deadline rules.
        sock = socket.create_connection(address, timeout, source_address)
        guard.attach(sock)
        return sock

    connection._create_connection = create_connection  # type: ignore[attr-defined]  # http.client's socket hook
    return connection


def _read_capped(response: http.client.HTTPResponse, *, max_reply: int) -> tuple[bytes, bool]:
    """The body, read in chunks, and whether it was longer than ``max_reply`` (then only its start)."""
    if response.length is not None and response.length > max_reply:
        return b"", True
    chunks: list[bytes] = []
    size = 0
    while chunk := response.read(min(_CHUNK, max_reply + 1 - size)):
        chunks.append(chunk)
        size += len(chunk)
        if size > max_reply:
            return b"".join(chunks)[:max_reply], True
    if response.length:  # http.client ends a body cut short without a word; it is no answer
        raise http.client.IncompleteRead(b"".join(chunks), response.length)
    return b"".join(chunks), False
