"""The daemon's start and health: which failures stop it for good (exit 2), which may pass (exit 75),
and what /healthz says. No worker process is started here."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import NoReturn

import pytest

from service import cli, daemon, http
from service.daemon import Daemon
from service.errors import ConfigError, PublishError, SinkwatchError
from service.logs import configure_logging
from service.metrics import Metrics
from service.publish import Publisher
from service.settings import Settings

# -- exit codes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ConfigError("bad setting"), 2),
        (PublishError("the queue folder is not writable: Read-only file system", path="/q"), cli.EX_TEMPFAIL),
    ],
)
def test_a_start_that_may_pass_exits_75_and_a_configuration_error_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], error: SinkwatchError, code: int
) -> None:
    # The unit's RestartPreventExitStatus=2 keeps sinkwatch down; any other failure is restarted.
    def fail(_args: argparse.Namespace) -> NoReturn:
        raise error

    monkeypatch.setattr(daemon, "main", fail)
    assert cli.main(["run"]) == code
    assert capsys.readouterr().err.startswith(f"sinkwatch: {error}")


def test_with_a_json_log_the_last_word_is_a_json_line_too(
    monkeypatch: pytest.MonkeyPatch, restored_logging: None
) -> None:
    # The daemon set the log up before it met the error (a metrics port in use): a log shipper parses every line.
    stream = io.StringIO()

    def fail(_args: argparse.Namespace) -> NoReturn:
        configure_logging(log_format="json", stream=stream)
        raise ConfigError("metrics listener: 127.0.0.1:18416 is already in use")

    monkeypatch.setattr(daemon, "main", fail)
    assert cli.main(["run"]) == 2
    [record] = [json.loads(line)["record"] for line in stream.getvalue().splitlines()]
    assert record["level"]["name"] == "ERROR" and record["message"].startswith("sinkwatch: metrics listener")


def test_an_error_that_is_neither_is_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(_args: argparse.Namespace) -> NoReturn:
        raise SinkwatchError("a bug")

    monkeypatch.setattr(daemon, "main", fail)
    with pytest.raises(SinkwatchError, match="a bug"):
        cli.main(["run"])


def test_run_once_refuses_a_missing_watch_folder_and_makes_nothing(tmp_path: Path) -> None:
    settings = Settings(watch=tmp_path / "typo", queue=tmp_path / "queue", metrics_port=0)
    with pytest.raises(ConfigError, match="the watch folder does not exist"):
        Daemon(settings).initialize(once=True)
    assert list(tmp_path.iterdir()) == []


@contextlib.contextmanager
def full_tmpfs(path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs at `path`, filled up (tests run as root); unmounted afterwards."""
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (needs root / CAP_SYS_ADMIN): {done.stderr!r}")
    try:
        with contextlib.suppress(OSError), (path / "filler").open("wb") as filler:
            while True:
                filler.write(b"\0" * 4096)
                filler.flush()
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_ledger_on_a_full_disk_at_start_is_a_transient_error(tmp_path: Path) -> None:
    with full_tmpfs(tmp_path / "state") as state, pytest.raises(PublishError, match="cannot open the ledger") as caught:
        daemon._open_ledger(state / "ledger.sqlite3")
    assert caught.value.transient


def test_a_full_queue_at_start_does_not_stop_the_daemon_for_its_record_of_the_watch_folder(tmp_path: Path) -> None:
    (tmp_path / "watch").mkdir()
    with full_tmpfs(tmp_path / "queue") as queue:
        settings = Settings(watch=tmp_path / "watch", queue=queue, state_dir=tmp_path / "state", metrics_port=0)
        running = Daemon(settings)
        try:
            running.initialize(once=True)  # publications wait for room, as they would later
        finally:
            running.resources.close()
        assert Publisher(queue).watch_folder() is None


def test_a_ledger_path_that_cannot_be_a_database_stays_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "ledger.sqlite3").mkdir()
    with pytest.raises(ConfigError, match="cannot open the ledger") as caught:
        daemon._open_ledger(tmp_path / "ledger.sqlite3")
    assert not caught.value.transient


# -- /healthz --------------------------------------------------------------------------------------


def probed_daemon(tmp_path: Path, *, watch_missing: bool, watcher: bool, watch_limit_reached: bool) -> Daemon:
    """A Daemon whose parts health() asks are stand-ins: no folders, workers or observer."""
    running = Daemon(Settings(watch=tmp_path / "watch", queue=tmp_path / "queue"), clock=lambda: 1000.0)
    running.watch_missing = watch_missing
    running.watcher = SimpleNamespace(alive=lambda: watcher)  # type: ignore[assignment]
    running.pool = SimpleNamespace(alive=lambda: True)  # type: ignore[assignment]
    running.discovery = SimpleNamespace(scanning=False, last_scan_done=990.0)  # type: ignore[assignment]
    running.watch_limit = SimpleNamespace(reached=watch_limit_reached)  # type: ignore[assignment]
    return running


def healthz(running: Daemon) -> tuple[int, dict[str, object]]:
    metrics = Metrics()
    with http.serve("127.0.0.1", 0, registry=metrics.registry, health=running.health, ready=lambda: True) as server:
        try:
            with urllib.request.urlopen(server.url + "/healthz", timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            with error:
                return error.code, json.loads(error.read())


def test_healthz_names_a_missing_watch_folder_and_only_the_checks_that_failed(tmp_path: Path) -> None:
    status, body = healthz(probed_daemon(tmp_path, watch_missing=True, watcher=False, watch_limit_reached=False))
    assert status == 503
    assert body["reason"] == "failed: watch_folder_missing, watcher"
    assert body["watch_folder_missing"] is True and body["watch_limit_reached"] is False


def test_healthz_is_ok_when_only_the_informational_watch_limit_is_reached(tmp_path: Path) -> None:
    status, body = healthz(probed_daemon(tmp_path, watch_missing=False, watcher=True, watch_limit_reached=True))
    assert status == 200, body
    assert body["watch_limit_reached"] is True and body["watch_folder_missing"] is False
    assert "reason" not in body


def test_a_paused_ledger_is_a_failed_check(tmp_path: Path) -> None:
    running = probed_daemon(tmp_path, watch_missing=False, watcher=True, watch_limit_reached=False)
    running.ledger_paused = True  # its disk full: nothing is processed until it records progress again
    status, body = healthz(running)
    assert (status, body["reason"], body["ledger"]) == (503, "failed: ledger", False)


def test_a_dead_watcher_on_a_present_folder_is_the_only_reason(tmp_path: Path) -> None:
    status, body = healthz(probed_daemon(tmp_path, watch_missing=False, watcher=False, watch_limit_reached=False))
    assert (status, body["reason"]) == (503, "failed: watcher")
