"""service.http: the one listener, spoken to with urllib on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import pytest

from service import http
from service.errors import ConfigError
from service.metrics import Metrics
from tests.conftest import wait_for


@dataclass
class Probe:
    """What the daemon would report; the tests flip it."""

    healthy: bool = True
    is_ready: bool = False
    details: dict[str, object] = field(default_factory=lambda: {"observer": "alive", "workers": 2})
    raises: Exception | None = None
    errors: list[str] = field(default_factory=list)

    def health(self) -> tuple[bool, Mapping[str, object]]:
        if self.raises is not None:
            raise self.raises
        return self.healthy, self.details

    def ready(self) -> bool:
        return self.is_ready


@dataclass
class Reply:
    status: int
    content_type: str
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


def get(url: str, *, accept: str | None = None) -> Reply:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return Reply(response.status, response.headers["Content-Type"], response.read())
    except urllib.error.HTTPError as error:
        with error:
            return Reply(error.code, error.headers["Content-Type"], error.read())


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
def server(metrics: Metrics, probe: Probe) -> Iterator[http.MetricsServer]:
    running = http.serve(
        "127.0.0.1",
        0,
        registry=metrics.registry,
        health=probe.health,
        ready=probe.ready,
        log_error=probe.errors.append,
    )
    yield running
    running.close()


def test_metrics_in_prometheus_text_format(server: http.MetricsServer, metrics: Metrics) -> None:
    metrics.rejected.labels(reason="corrupt").inc()
    metrics.queue_depth.set(7)
    reply = get(server.url + "/metrics")
    assert reply.status == 200
    assert reply.content_type.startswith("text/plain; version=0.0.4")
    text = reply.body.decode()
    assert 'sinkwatch_rejections_total{reason="corrupt"} 1.0' in text
    assert "sinkwatch_queue_depth 7.0" in text
    assert "process_start_time_seconds" in text


def test_metrics_in_openmetrics_when_asked(server: http.MetricsServer) -> None:
    reply = get(server.url + "/metrics", accept="application/openmetrics-text; version=1.0.0")
    assert reply.status == 200
    assert reply.content_type.startswith("application/openmetrics-text")
    assert reply.body.endswith(b"# EOF\n")
    assert b"# TYPE sinkwatch_build info" in reply.body


def test_query_string_is_ignored(server: http.MetricsServer) -> None:
    def families(url: str) -> set[str]:
        reply = get(url)
        assert reply.status == 200
        return {line.split()[2] for line in reply.body.decode().splitlines() if line.startswith("# TYPE ")}

    # prometheus_client's own handler would serve only sinkwatch_workers for this query.
    everything = families(server.url + "/metrics")
    assert {"sinkwatch_workers", "sinkwatch_rejections_total", "process_start_time_seconds"} <= everything
    assert families(server.url + "/metrics?name[]=sinkwatch_workers") == everything


def test_healthz_follows_the_probe(server: http.MetricsServer, probe: Probe) -> None:
    reply = get(server.url + "/healthz")
    assert (reply.status, reply.content_type) == (200, "application/json")
    assert reply.json() == {"status": "ok", "observer": "alive", "workers": 2}

    probe.healthy = False
    probe.details = {"reason": "observer stopped", "observer": "dead"}
    reply = get(server.url + "/healthz")
    assert reply.status == 503
    assert reply.json() == {"status": "unhealthy", "reason": "observer stopped", "observer": "dead"}


def test_an_unhealthy_probe_without_reason_gets_one(server: http.MetricsServer, probe: Probe) -> None:
    probe.healthy = False
    probe.details = {"watcher": False, "workers": True, "scan_recent": False, "last_scan_age_seconds": 400.0}
    reply = get(server.url + "/healthz")
    assert reply.status == 503
    body = reply.json()
    assert isinstance(body, dict)
    assert body["reason"] == "failed: watcher, scan_recent"
    assert body["last_scan_age_seconds"] == 400.0


def test_healthz_is_503_when_the_probe_raises(server: http.MetricsServer, probe: Probe) -> None:
    probe.raises = RuntimeError("pool gone")
    reply = get(server.url + "/healthz")
    assert reply.status == 503
    body = reply.json()
    assert isinstance(body, dict) and "pool gone" in body["reason"]
    assert any("pool gone" in line for line in probe.errors)


def test_readyz_follows_the_probe(server: http.MetricsServer, probe: Probe) -> None:
    reply = get(server.url + "/readyz")
    assert (reply.status, reply.json()) == (503, {"ready": False})
    probe.is_ready = True
    reply = get(server.url + "/readyz")
    assert (reply.status, reply.json()) == (200, {"ready": True})


@pytest.mark.parametrize("path", ["/", "/metrics/extra", "/health", "/favicon.ico"])
def test_other_paths_are_404(server: http.MetricsServer, path: str) -> None:
    assert get(server.url + path).status == 404


def test_requests_are_not_logged_to_stderr(server: http.MetricsServer, capfd: pytest.CaptureFixture[str]) -> None:
    for path in ("/metrics", "/healthz", "/nope"):
        get(server.url + path)
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


def test_port_in_use_is_a_config_error(metrics: Metrics, probe: Probe) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as caught:
            http.serve("127.0.0.1", port, registry=metrics.registry, health=probe.health, ready=probe.ready)
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message
    assert "--metrics-port" in message


def test_an_address_not_on_this_host_is_a_config_error(metrics: Metrics, probe: Probe) -> None:
    # 192.0.2.0/24 is TEST-NET-1: never assigned to a local interface.
    with pytest.raises(ConfigError, match=r"192\.0\.2\.1:0.*--metrics-host"):
        http.serve("192.0.2.1", 0, registry=metrics.registry, health=probe.health, ready=probe.ready)


def test_close_stops_listening_and_is_idempotent(metrics: Metrics, probe: Probe) -> None:
    running = http.serve("127.0.0.1", 0, registry=metrics.registry, health=probe.health, ready=probe.ready)
    assert running.url == f"http://127.0.0.1:{running.port}"
    assert get(running.url + "/readyz").status == 503
    running.close()
    running.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(running.url + "/metrics", timeout=5)


def test_close_right_after_a_request_does_not_wait_for_a_poll(metrics: Metrics, probe: Probe) -> None:
    # serve_forever sees a shutdown only at its next poll: half a second after the select that a request
    # just ended began. That was half a second of every stop of the daemon.
    waits = []
    for _ in range(3):
        running = http.serve("127.0.0.1", 0, registry=metrics.registry, health=probe.health, ready=probe.ready)
        assert get(running.url + "/readyz").status == 503
        started = time.monotonic()
        running.close()
        waits.append(time.monotonic() - started)
    assert min(waits) < 0.25, f"close waited {min(waits):.2f} s at best"


def test_a_silent_client_does_not_hold_close_forever(
    metrics: Metrics, probe: Probe, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http, "REQUEST_TIMEOUT", 0.2)
    before = set(threading.enumerate())
    with http.serve("127.0.0.1", 0, registry=metrics.registry, health=probe.health, ready=probe.ready) as running:
        silent = socket.create_connection(("127.0.0.1", running.port))
        # The request thread exists once the connection is accepted.
        wait_for(lambda: len(set(threading.enumerate()) - before) >= 2)
        started = time.monotonic()
    closing = time.monotonic() - started
    silent.close()
    assert closing < 30 * http.REQUEST_TIMEOUT, f"close waited {closing:.1f} s for a client that says nothing"


def test_a_client_trickling_its_request_does_not_hold_close(metrics: Metrics, probe: Probe) -> None:
    # Each read is within REQUEST_TIMEOUT, so only cutting the connection ends the request thread.
    running = http.serve("127.0.0.1", 0, registry=metrics.registry, health=probe.health, ready=probe.ready)
    slow = socket.create_connection(("127.0.0.1", running.port))
    stop = threading.Event()

    def trickle() -> None:
        for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\n" * 100:
            if stop.wait(http.REQUEST_TIMEOUT / 10):
                return
            with contextlib.suppress(OSError):
                slow.send(bytes([byte]))

    writer = threading.Thread(target=trickle)
    writer.start()
    try:
        time.sleep(http.REQUEST_TIMEOUT / 2)
        closing = threading.Thread(target=running.close)
        closing.start()
        closing.join(timeout=2 * http.REQUEST_TIMEOUT)
        assert not closing.is_alive(), "close() waits on a client that keeps sending"
    finally:
        stop.set()
        writer.join()
        slow.close()


@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/readyz"])
def test_head_answers_with_the_status_and_headers_of_get(server: http.MetricsServer, path: str) -> None:
    request = urllib.request.Request(server.url + path, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, headers, body = response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        with error:
            status, headers, body = error.code, error.headers, error.read()
    got = get(server.url + path)
    assert (status, headers["Content-Type"]) == (got.status, got.content_type)
    assert int(headers["Content-Length"]) > 0 and body == b""
