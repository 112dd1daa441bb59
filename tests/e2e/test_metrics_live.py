"""The live /metrics, /healthz and /readyz of a running daemon: promtool checks the exposition, a
real Prometheus server scrapes it and answers PromQL, and health follows the observer."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.engine import Engine
from service.selection import Selection
from service.settings import Settings
from service.watcher import FolderWatcher
from tests.conftest import PHOTO_NAMES, load_photo, wait_for
from tests.e2e.conftest import (
    DaemonProcess,
    InProcessDaemon,
    check_watch_unchanged,
    free_port,
    http_get,
    logged,
    metric_sum,
    small_photo,
    snapshot,
    wait_published,
    write_photo,
)

PHOTOS = PHOTO_NAMES[:3]


@contextlib.contextmanager
def set_on_exit(event: threading.Event) -> Iterator[None]:
    """Set `event` when the block ends, however it ends (releases a held daemon thread)."""
    try:
        yield
    finally:
        event.set()


def tool(name: str) -> str:
    """The path of a Prometheus binary; a missing one fails the test (never a skip)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH: install the 'prometheus' package (apt-get install prometheus)")
    return path


@pytest.fixture(scope="module")
def busy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """A daemon that has published 3 real photos and rejected 1 corrupt file, and nothing else."""
    root = tmp_path_factory.mktemp("busy")
    watch, queue = root / "watch", root / "queue"
    watch.mkdir()
    daemon = DaemonProcess(watch, queue, root / "daemon.log").start()
    try:
        for name in PHOTOS:
            write_photo(watch / f"{name}.png", load_photo(name))
        # Junk after the signature: corrupt. (Zeros there would be a file still being written: a retry.)
        (watch / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 75)
        before = snapshot(watch)
        wait_published(queue, 3)
        wait_for(lambda: len(logged(daemon.records(), "published")) == 3 and logged(daemon.records(), "rejected"))
        yield daemon
        check_watch_unchanged(watch, before)
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log.read_text()[-4000:]


def test_live_metrics_pass_promtool_and_count_exactly_what_happened(busy: DaemonProcess) -> None:
    status, text = busy.get("/metrics")
    assert status == 200
    checked = subprocess.run(
        [tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, f"promtool check metrics:\n{checked.stdout}{checked.stderr}"

    assert metric_sum(text, "sinkwatch_images_processed_total", outcome="published") == 3
    assert metric_sum(text, "sinkwatch_images_processed_total", outcome="rejected") == 1
    assert metric_sum(text, "sinkwatch_rejections_total") == 1
    assert metric_sum(text, "sinkwatch_rejections_total", reason="corrupt") == 1
    assert metric_sum(text, "sinkwatch_images_discovered_total") == 4
    assert metric_sum(text, "sinkwatch_stage_duration_seconds_count", stage="decode") == 3
    assert metric_sum(text, "sinkwatch_mask_coverage_ratio_count") == 3
    assert metric_sum(text, "sinkwatch_last_publish_timestamp_seconds") > 0
    assert metric_sum(text, "sinkwatch_watcher_up") == 1
    assert metric_sum(text, "sinkwatch_publish_latency_seconds_count") == 3  # all three came as events
    assert metric_sum(text, "sinkwatch_queue_depth") == metric_sum(text, "sinkwatch_in_flight") == 0
    assert metric_sum(text, "sinkwatch_rejections_total", reason="bomb") == 0  # known labels exist at 0


@pytest.mark.slow
def test_a_real_prometheus_scrapes_the_daemon_and_promql_returns_the_published_count(
    busy: DaemonProcess, tmp_path: Path
) -> None:
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: sinkwatch\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{busy.port}']\n",
        encoding="utf-8",
    )
    log = tmp_path / "prometheus.log"
    with log.open("wb") as handle:
        server = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=handle,
            stderr=handle,
            cwd=tmp_path,
        )
    api = f"http://127.0.0.1:{port}/api/v1/query?query="

    def query(promql: str) -> list[dict[str, object]] | None:
        if server.poll() is not None:
            pytest.fail(f"prometheus exited with {server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            status, body = http_get(api + urllib.parse.quote(promql))
        except OSError:
            return None  # not listening yet
        if status != 200:
            return None  # starting up (503) until the TSDB is open
        answer = json.loads(body)
        assert answer["status"] == "success", answer
        result: list[dict[str, object]] = answer["data"]["result"]
        return result

    def value(promql: str) -> float | None:
        result = query(promql)
        return float(result[0]["value"][1]) if result else None  # type: ignore[index]

    try:
        wait_for(lambda: value('up{job="sinkwatch"}') == 1, timeout=60)
        published = 'sum(sinkwatch_images_processed_total{job="sinkwatch",outcome="published"})'
        wait_for(lambda: value(published) is not None, timeout=30)
        assert value(published) == 3
        assert value('sum(sinkwatch_rejections_total{reason="corrupt"})') == 1
    finally:
        server.terminate()
        code = server.wait(timeout=60)
    assert code == 0, log.read_text()[-4000:]


def test_readyz_is_503_until_the_startup_scan_is_queued_and_200_from_then_on(
    folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    watch, queue = folders
    backlog = 4
    for index in range(backlog):
        write_photo(watch / f"backlog_{index}.png", small_photo(index))
    scanning, may_scan = threading.Event(), threading.Event()
    scan = Selection.scan_keys

    def held_scan(self: Selection) -> Iterator[tuple[str, str]]:
        # The startup scan waits here until the test has asked /readyz.
        scanning.set()
        assert may_scan.wait(timeout=60)
        yield from scan(self)

    monkeypatch.setattr(Selection, "scan_keys", held_scan)
    port = free_port()
    readyz = f"http://127.0.0.1:{port}/readyz"
    settings = Settings(watch=watch, queue=queue, metrics_port=port, workers=1, settle_seconds=0.3)
    # Released before the daemon is stopped, also when an assertion fails (exits run in reverse order).
    with InProcessDaemon(settings, wait_ready=False) as running, set_on_exit(may_scan):
        wait_for(scanning.is_set, timeout=60)
        status, body = http_get(readyz)
        assert (status, json.loads(body)) == (503, {"ready": False})

        may_scan.set()
        wait_for(lambda: http_get(readyz)[0] == 200, timeout=30)
        assert running.sample("sinkwatch_images_discovered_total", source="startup") == backlog
        wait_published(queue, backlog)
        assert http_get(readyz) == (200, json.dumps({"ready": True}))


def test_readyz_is_503_from_the_moment_the_daemon_begins_to_stop(
    folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    watch, queue = folders
    draining, may_drain = threading.Event(), threading.Event()
    drain = Engine.drain

    def held_drain(self: Engine) -> None:
        # The shutdown waits here, its listener still up, until the test has asked /readyz.
        draining.set()
        assert may_drain.wait(timeout=60)
        drain(self)

    monkeypatch.setattr(Engine, "drain", held_drain)
    port = free_port()
    readyz = f"http://127.0.0.1:{port}/readyz"
    settings = Settings(watch=watch, queue=queue, metrics_port=port, workers=1, settle_seconds=0.3)
    with InProcessDaemon(settings) as running, set_on_exit(may_drain):
        wait_for(lambda: http_get(readyz)[0] == 200, timeout=30)
        running.daemon.stop()
        wait_for(draining.is_set, timeout=60)
        assert http_get(readyz) == (503, json.dumps({"ready": False}))


def test_healthz_turns_503_when_the_observer_stops_and_200_after_it_is_restarted(
    folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    watch, queue = folders
    restart_begun, may_restart = threading.Event(), threading.Event()
    restart = FolderWatcher.restart

    def held_restart(self: FolderWatcher) -> None:
        # Hold the daemon's restart of the dead observer until the test has seen the 503.
        restart_begun.set()
        assert may_restart.wait(timeout=60)
        restart(self)

    monkeypatch.setattr(FolderWatcher, "restart", held_restart)
    port = free_port()
    settings = Settings(watch=watch, queue=queue, metrics_port=port, workers=1, settle_seconds=0.3)
    health = f"http://127.0.0.1:{port}/healthz"
    with InProcessDaemon(settings) as running, set_on_exit(may_restart):
        status, body = http_get(health)
        assert status == 200, body
        assert http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200

        running.daemon.watcher.stop()
        wait_for(restart_begun.is_set)
        status, body = http_get(health)
        assert status == 503, body
        answer = json.loads(body)
        assert answer["watcher"] is False and "watcher" in answer["reason"], answer
        assert running.sample("sinkwatch_watcher_up") == 0

        may_restart.set()
        wait_for(lambda: http_get(health)[0] == 200)
        assert running.sample("sinkwatch_watcher_restarts_total") == 1
        assert running.sample("sinkwatch_watcher_up") == 1
        # The new observer delivers events again.
        write_photo(watch / "after_restart.png", small_photo(1))
        wait_published(queue, 1, timeout=30)
        wait_for(lambda: running.sample("sinkwatch_images_discovered_total", source="event") == 1)


def test_healthz_is_503_while_the_watch_folder_is_gone_and_200_once_it_is_back(daemon: DaemonProcess) -> None:
    watch, queue = daemon.watch, daemon.queue
    daemon.start()
    assert daemon.get("/healthz")[0] == 200
    shutil.rmtree(watch)

    def unhealthy() -> dict[str, object] | None:
        status, body = daemon.get("/healthz")
        return json.loads(body) if status == 503 else None

    answer = wait_for(unhealthy, timeout=30)
    assert isinstance(answer, dict) and answer["watcher"] is False, answer
    # /healthz sees the loss at once; the daemon loop logs it on its next turn.
    wait_for(lambda: any("disappeared" in m for m in daemon.messages()), timeout=10)

    watch.mkdir()
    # Healthy again once the observer has been restarted on the new folder.
    restarts = "sinkwatch_watcher_restarts_total"
    wait_for(lambda: metric_sum(daemon.get("/metrics")[1], restarts) == 1 and daemon.get("/healthz")[0] == 200)
    write_photo(watch / "back.png", small_photo(2))
    wait_published(queue, 1, timeout=30)
    wait_for(lambda: "back.png" in logged(daemon.records(), "published"))
    assert metric_sum(daemon.get("/metrics")[1], "sinkwatch_images_discovered_total", source="event") == 1
