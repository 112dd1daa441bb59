"""The daemon's loop and its reconciliation scans, on a clock of the test's.

A real daemon (watch folder, ledger, inotify watcher; no metrics server) over a folder whose
files the ledger already holds, so that a scan finds nothing to do and no worker ever starts.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.daemon import LOOP_TICK, Daemon
from service.discovery import SCAN_FILES_PER_TURN
from service.engine import Engine
from service.ledger import Ledger
from service.selection import Selection
from service.settings import Settings
from tests.service.conftest import FakeClock, file_stamp

FILES = 2 * SCAN_FILES_PER_TURN + 88  # three turns of a scan
RESCAN = 60.0


@pytest.fixture
def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Daemon, FakeClock, list[float]]]:
    """The initialized daemon, its clock, and the timeout of every engine pump since."""
    watch, queue, state = tmp_path / "watch", tmp_path / "queue", tmp_path / "state"
    for folder in (watch, queue, state):
        folder.mkdir()
    with Ledger(state / "ledger.sqlite3") as ledger:
        for number in range(FILES):
            path = watch / f"{number:04}.png"
            path.write_bytes(b"recorded as published: never read")
            ledger.published(path.name, **file_stamp(path), sha256="0" * 64, rule="default", fingerprint="f")
    timeouts: list[float] = []
    pump = Engine.pump

    def recorded(engine: Engine, *, timeout: float = LOOP_TICK) -> int:
        timeouts.append(timeout)
        return pump(engine, timeout=timeout)

    monkeypatch.setattr(Engine, "pump", recorded)
    settings = Settings(
        watch=watch, queue=queue, state_dir=state, metrics_port=0, workers=1, rescan_interval=RESCAN, queue_size=1024
    )
    clock = FakeClock()
    running = Daemon(settings, clock=clock)
    running.initialize()
    try:
        yield running, clock, timeouts
    finally:
        running.shutdown()


def turn(daemon: Daemon, clock: FakeClock, ticks: int) -> None:
    for _ in range(ticks):
        clock.advance(LOOP_TICK)
        daemon.tick()


def test_a_rescan_due_while_one_runs_does_not_queue_a_second(
    daemon: tuple[Daemon, FakeClock, list[float]], monkeypatch: pytest.MonkeyPatch
) -> None:
    running, clock, _timeouts = daemon
    turn(running, clock, 5)
    assert not running.discovery.scanning, "the startup scan of settled files takes three turns"
    started: list[str] = []
    scan_keys = Selection.scan_keys

    def counted(selection: Selection) -> Iterator[tuple[str, str]]:
        started.append("scan")
        return scan_keys(selection)

    monkeypatch.setattr(Selection, "scan_keys", counted)
    clock.now += RESCAN
    turn(running, clock, 20)
    # The scan runs over several turns, each of them after the interval: one scan all the same.
    assert started == ["scan"]
    assert not running.discovery.scanning
    assert not running.engine.pending and not running.engine.in_flight
    clock.now = running.discovery.last_scan_done + RESCAN - 1.0
    turn(running, clock, 3)
    assert started == ["scan"]
    clock.now += 1.0
    turn(running, clock, 1)
    assert started == ["scan", "scan"], "the next rescan comes one interval after the last one ended"


def test_a_scan_goes_on_without_waiting_and_an_idle_loop_waits(daemon: tuple[Daemon, FakeClock, list[float]]) -> None:
    running, clock, timeouts = daemon
    ticks = 0
    while running.discovery.scanning:
        turn(running, clock, 1)
        ticks += 1
        assert ticks < 10, "the startup scan did not end"
    turn(running, clock, 3)
    # Each turn of the scan except the last (which ends it before the pump) hurries; then the loop waits.
    assert timeouts == [0.0] * (ticks - 1) + [LOOP_TICK] * 4
