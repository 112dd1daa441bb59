"""Engine.recover on a real ledger: what a run killed as a whole (daemon and workers) leaves in flight.

An out-of-memory kill of the whole control group (systemd's OOMPolicy=kill, a Kubernetes container) takes the
daemon with the worker that ran out of memory; the next start finds the image's row still "processing". Each
restart is a new engine on the same ledger; nothing is dispatched: a "run" is `ledger.start`, as `_dispatch`
records it, followed by the kill.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from service.engine import Engine
from service.ledger import Ledger
from tests.service.conftest import IdleEngine, file_stamp

MAX_ATTEMPTS = 3  # the idle engine's limit
CONTENT = b"recovery judges the file's kind and the ledger row; it never reads the file"


Restart = Callable[[], Engine]


@pytest.fixture
def restart(watch: Path, idle_engine: IdleEngine, ledger: Ledger) -> Restart:
    """A daemon starting after a kill: a fresh engine (nothing remembered but the ledger), recovered."""

    def start() -> Engine:
        engine = idle_engine(resolve=watch.joinpath, ledger=ledger)
        engine.recover(kills_count=True)
        return engine

    return start


def killed_while_running(ledger: Ledger, *paths: Path) -> None:
    """The sources' attempts start, and the whole service is killed before any ends."""
    for path in paths:
        ledger.start(path.name, **file_stamp(path), sha256=None, rule="default", fingerprint="f")


def source(watch: Path, name: str) -> Path:
    path = watch / name
    path.write_bytes(CONTENT)
    return path


def test_an_image_in_flight_when_the_service_was_killed_runs_again_alone_and_the_kill_is_not_counted(
    watch: Path, restart: Restart, ledger: Ledger
) -> None:
    """The first kill may be a reboot or an operator's kill -9: it never counts against the image."""
    killed_while_running(ledger, source(watch, "cat.png"))
    engine = restart()
    assert list(engine.pending) == ["cat.png"] and engine.suspects == {"cat.png"}
    entry = ledger.get("cat.png")
    assert entry is not None
    assert (entry.state, entry.reason, entry.attempts) == ("retry", "crashed", 0)
    assert entry.message == "sinkwatch was killed while cat.png was in flight; trying it again on its own"
    assert engine.counts["retried"] == 1


def test_images_in_flight_together_when_the_service_was_killed_are_never_counted(
    watch: Path, restart: Restart, ledger: Ledger
) -> None:
    paths = [source(watch, f"{name}.png") for name in ("a", "b", "c")]
    for _kill in range(2 * MAX_ATTEMPTS):
        killed_while_running(ledger, *paths)
        engine = restart()
        assert set(engine.pending) == engine.suspects == {"a.png", "b.png", "c.png"}
    for name in ("a.png", "b.png", "c.png"):
        entry = ledger.get(name)
        assert entry is not None and (entry.state, entry.attempts) == ("retry", 0), name


def test_an_image_that_gets_the_whole_service_killed_each_time_it_runs_alone_is_rejected(
    watch: Path, restart: Restart, ledger: Ledger
) -> None:
    """Before, each restart's recovery gave the attempt back: the service was killed and restarted for ever."""
    path = source(watch, "poison.png")
    killed_while_running(ledger, path, source(watch, "bystander.png"))  # in a burst, with another image
    engine = restart()
    kills = 1
    while "poison.png" in engine.pending:
        assert kills <= MAX_ATTEMPTS + 2, "the image was never rejected"
        killed_while_running(ledger, path)  # after a restart it runs alone, as a suspect does
        engine = restart()
        kills += 1
    # The kill among others counts for neither image, then each kill of its own runs counts, up to the limit.
    assert kills == 1 + MAX_ATTEMPTS
    entry = ledger.get("poison.png")
    assert entry is not None
    assert (entry.state, entry.reason, entry.attempts) == ("rejected", "crashed", MAX_ATTEMPTS)
    assert entry.message == f"sinkwatch was killed on this image (attempt {MAX_ATTEMPTS} of {MAX_ATTEMPTS})"
    record = json.loads((engine.queue / "rejected" / "poison.json").read_text(encoding="utf-8"))
    assert (record["error"], record["reason"], record["key"]) == ("ServiceKilled", "crashed", "poison.png")
    assert engine.metrics.registry.get_sample_value("sinkwatch_rejections_total", {"reason": "crashed"}) == 1
    assert "poison.png" not in engine.suspects
    bystander = ledger.get("bystander.png")
    assert bystander is not None and (bystander.state, bystander.attempts) == ("retry", 0)


def test_a_changed_image_starts_its_count_afresh(watch: Path, restart: Restart, ledger: Ledger) -> None:
    """A new version of the file (the generator wrote it again) is another image: earlier kills are not its own."""
    path = source(watch, "cat.png")
    for _kill in range(MAX_ATTEMPTS):
        killed_while_running(ledger, path)
        restart()
    assert ledger.get("cat.png").attempts == MAX_ATTEMPTS - 1  # type: ignore[union-attr]
    path.write_bytes(CONTENT + b"a new version")
    killed_while_running(ledger, path)
    engine = restart()
    entry = ledger.get("cat.png")
    assert entry is not None and (entry.state, entry.attempts) == ("retry", 1)
    assert list(engine.pending) == ["cat.png"]


def test_kills_that_were_no_images_doing_never_count(watch: Path, idle_engine: IdleEngine, ledger: Ledger) -> None:
    """Killed in its stop (systemd's TimeoutStopSec, a Kubernetes grace period) or by the machine going down: the
    images in flight run alone again, but no number of such kills rejects one."""
    path = source(watch, "slow.png")
    for _kill in range(2 * MAX_ATTEMPTS):
        killed_while_running(ledger, path)
        engine = idle_engine(resolve=watch.joinpath, ledger=ledger)
        engine.recover(kills_count=False)
        assert list(engine.pending) == ["slow.png"] and engine.suspects == {"slow.png"}
    entry = ledger.get("slow.png")
    assert entry is not None and (entry.state, entry.attempts) == ("retry", 0)
