"""The one HTTP listener: ``/metrics``, ``/healthz`` and ``/readyz``.

A ``ThreadingHTTPServer`` runs in a daemon thread. It answers from callables
the daemon passes in, so it knows nothing about watchers or workers and can be
tested alone. Requests are not logged (a scrape every 15 s is noise); errors
inside a handler go to the optional ``log_error`` callback.
"""

from __future__ import annotations

import contextlib
import errno
import json
import selectors
import socket
import socketserver
import sys
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from service.errors import ConfigError

Health = Callable[[], tuple[bool, Mapping[str, object]]]
Ready = Callable[[], bool]
LogError = Callable[[str], None]

# A client that connects and sends nothing must not hold a thread (and
# close()) for longer than this.
REQUEST_TIMEOUT = 5.0


class MetricsServer:
    """A running listener; ``close()`` stops it and joins its threads."""

    def __init__(self, httpd: _Server, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        self.host = str(httpd.server_address[0])
        self.port = int(httpd.server_address[1])
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{host}:{self.port}"

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._httpd.stop()
        self._thread.join()
        self._httpd.cut_connections()
        self._httpd.server_close()  # also joins request threads still answering

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def serve(
    host: str,
    port: int,
    *,
    registry: CollectorRegistry,
    health: Health,
    ready: Ready,
    log_error: LogError | None = None,
) -> MetricsServer:
    """Bind ``host:port`` (0: any free port) and answer in a background thread.

    ``health()`` returns ``(healthy, details)``: details are merged into the
    JSON body; when unhealthy without a ``reason`` key, the reason names the
    details that are False (``{"watcher": False}`` -> ``"failed: watcher"``).
    A port in use or an address that cannot be bound is a :class:`ConfigError`.
    """
    family = _address_family(host, port)
    handler = _handler_class(registry=registry, health=health, ready=ready, log_error=log_error)
    try:
        httpd = _Server((host, port), handler, family=family, log_error=log_error)
    except OSError as exc:
        raise ConfigError(_bind_message(host, port, exc)) from exc
    thread = threading.Thread(target=httpd.serve_until_stopped, name="sinkwatch-http", daemon=True)
    thread.start()
    return MetricsServer(httpd, thread)


class _Server(ThreadingHTTPServer):
    # Request threads are tracked and joined by server_close(), so close()
    # leaves no thread behind. REQUEST_TIMEOUT bounds each read only: a client
    # trickling a byte every few seconds would hold close() (and the daemon's
    # stop) for ever, so close() cuts the connections still open first.
    daemon_threads = False
    block_on_close = True
    # handle_request's own wait, once serve_until_stopped saw a connection: bounded in case it is gone already.
    timeout = 1.0

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        *,
        family: socket.AddressFamily,
        log_error: LogError | None,
    ) -> None:
        self.address_family = family  # read by TCPServer.__init__ to create the socket
        self.log_error = log_error
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self._wake, self._waker = socket.socketpair()
        super().__init__(address, handler)

    def serve_until_stopped(self) -> None:
        """Answer requests until :meth:`stop`.

        Not ``serve_forever``: that notices a ``shutdown()`` only at its next poll, which added half a
        second to every stop of the daemon; a byte on a socket pair wakes this loop at once.
        """
        with selectors.DefaultSelector() as selector:
            selector.register(self, selectors.EVENT_READ)
            selector.register(self._wake, selectors.EVENT_READ)
            while all(key.fileobj is not self._wake for key, _events in selector.select()):
                self.handle_request()

    def stop(self) -> None:
        self._waker.send(b"\0")

    def server_close(self) -> None:
        super().server_close()
        self._wake.close()
        self._waker.close()

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        # Registered on the serving thread, before the request's own starts: once serve_until_stopped has
        # returned, cut_connections sees every connection it accepted.
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: socket.socket) -> None:  # type: ignore[override]
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def cut_connections(self) -> None:
        """End every connection still open: its request thread's read fails at once."""
        with self._connections_lock:
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, a DNS lookup that
        # can stall startup; the name is never used here.
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    def handle_error(self, request: object, client_address: object) -> None:
        if self.log_error is not None:
            self.log_error(f"metrics listener: error answering {client_address}: {sys.exc_info()[1]!r}")


def _handler_class(
    *, registry: CollectorRegistry, health: Health, ready: Ready, log_error: LogError | None
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = REQUEST_TIMEOUT
        send_body = True

        def do_HEAD(self) -> None:
            # Probes that ask with HEAD (load balancers, `curl -I`) get GET's status and headers.
            self.send_body = False
            self.do_GET()

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._send(200, content_type, encoder(registry))
            elif path == "/healthz":
                ok, details = _call_health(health, log_error)
                body = {"status": "ok" if ok else "unhealthy", **details}
                if not ok:
                    body.setdefault("reason", _failed_checks(details))
                self._send_json(200 if ok else 503, body)
            elif path == "/readyz":
                is_ready = _call_ready(ready, log_error)
                self._send_json(200 if is_ready else 503, {"ready": is_ready})
            else:
                self._send_json(404, {"error": "not found", "paths": ["/metrics", "/healthz", "/readyz"]})

        def _send_json(self, status: int, body: Mapping[str, object]) -> None:
            data = json.dumps(body, default=str, sort_keys=True).encode()
            self._send(status, "application/json", data)

        def _send(self, status: int, content_type: str, data: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if self.send_body:
                self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            """No access log: the daemon's logs are for what the daemon does."""

    return Handler


def _call_health(health: Health, log_error: LogError | None) -> tuple[bool, Mapping[str, object]]:
    try:
        return health()
    except Exception as exc:  # a broken probe must answer 503, not kill the request
        if log_error is not None:
            log_error(f"health check raised {exc!r}")
        return False, {"reason": f"health check failed: {exc!r}"}


def _failed_checks(details: Mapping[str, object]) -> str:
    """A reason when the probe gave none: the checks it reported as False."""
    failed = [name for name, value in details.items() if value is False]
    return "failed: " + ", ".join(failed) if failed else "unhealthy"


def _call_ready(ready: Ready, log_error: LogError | None) -> bool:
    try:
        return bool(ready())
    except Exception as exc:
        if log_error is not None:
            log_error(f"readiness check raised {exc!r}")
        return False


def _address_family(host: str, port: int) -> socket.AddressFamily:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"metrics listener: cannot resolve host {host!r} ({exc}); check --metrics-host") from exc
    return infos[0][0]


def _bind_message(host: str, port: int, exc: OSError) -> str:
    where = f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return (
            f"metrics listener: {where} is already in use (another sinkwatch or exporter?); "
            "choose a free port with --metrics-port (SINKWATCH_METRICS_PORT), or 0 to disable"
        )
    return f"metrics listener: cannot listen on {where}: {exc.strerror or exc}; check --metrics-host and --metrics-port"
