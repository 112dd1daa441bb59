"""Engine.requeue_due and Engine.retrying: which waiting retries are offered again, and when a run may end.

Real ledger and engine; nothing is dispatched, the pending queue and the ledger are what the tests read.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from service.engine import Candidate, Engine
from service.errors import PublishError
from tests.service.conftest import IdleEngine

CONTENT = b"the engine judges the file's kind, size and mtime; it never reads it here"
MAX_ATTEMPTS = 3


@pytest.fixture
def engine(watch: Path, idle_engine: IdleEngine) -> Engine:
    return idle_engine(resolve=lambda key: watch / key)


def waiting(engine: Engine, watch: Path, name: str, *, due: bool = True, at: float | None = None) -> Path:
    """A source with a retry row (after one failed attempt) that is due now, or a minute ahead (or `at`)."""
    path = watch / name
    path.write_bytes(CONTENT)
    st = path.stat()
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino, "ctime_ns": st.st_ctime_ns}
    engine.ledger.start(name, **stamp, sha256=None, rule="default", fingerprint="f")
    if at is None:
        at = 0.0 if due else time.time() + 60.0
    engine.ledger.retry(name, reason="incomplete", message="", next_attempt=at)
    return path


def test_a_due_retry_of_a_regular_file_is_offered_again(engine: Engine, watch: Path) -> None:
    waiting(engine, watch, "a.png")
    engine.requeue_due()
    assert list(engine.pending) == ["a.png"]
    assert engine.pending["a.png"].source == "retry"


def test_a_retry_after_a_worker_crash_runs_alone_also_after_a_restart(engine: Engine, watch: Path) -> None:
    """Which images run alone lived only in the stopped daemon: a poison image crashing beside others after each
    restart was never counted (no crash of its own), and was never rejected."""
    path = watch / "poison.png"
    path.write_bytes(CONTENT)
    st = path.stat()
    engine.ledger.start("poison.png", size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=None, rule="d", fingerprint="f")
    engine.ledger.worker_died("poison.png", counted=False, message="in flight with others", next_attempt=0.0)
    waiting(engine, watch, "incomplete.png")
    assert not engine.suspects  # as a new daemon starts

    engine.requeue_due()
    assert set(engine.pending) == {"poison.png", "incomplete.png"} and engine.suspects == {"poison.png"}


def test_a_retry_not_due_yet_is_left_waiting(engine: Engine, watch: Path) -> None:
    waiting(engine, watch, "later.png", due=False)
    engine.requeue_due()
    assert list(engine.pending) == []


def test_a_retry_set_further_ahead_than_any_delay_is_due_the_clock_was_set_back_since(
    engine: Engine, watch: Path
) -> None:
    # Set at 10:00 for 10:00:08 by a clock that read a day ahead; the longest delay is minutes.
    assert engine.outcomes.longest_delay < 3600
    waiting(engine, watch, "a.png", at=time.time() + 86_400)
    engine.requeue_due()
    assert list(engine.pending) == ["a.png"]


@pytest.mark.parametrize("becomes", ["a folder", "a dangling symlink", "nothing"])
def test_a_due_retry_whose_file_is_no_longer_a_regular_file_is_forgotten_so_a_run_can_end(
    engine: Engine, watch: Path, becomes: str
) -> None:
    path = waiting(engine, watch, "a.png")
    path.unlink()
    if becomes == "a folder":
        path.mkdir()
    elif becomes == "a dangling symlink":
        os.symlink(watch / "absent.png", path)
    assert engine.retrying(MAX_ATTEMPTS)

    engine.requeue_due()

    assert engine.ledger.get("a.png") is None
    assert not engine.pending
    assert not engine.retrying(MAX_ATTEMPTS), "a `run --once` or `process` would wait for this row for ever"


def test_only_the_given_keys_are_requeued_and_waited_for(engine: Engine, watch: Path) -> None:
    waiting(engine, watch, "daemons.png")
    waiting(engine, watch, "later.png", due=False)
    waiting(engine, watch, "mine.png")

    engine.requeue_due({"mine.png"})

    assert list(engine.pending) == ["mine.png"]
    left = engine.ledger.get("daemons.png")
    assert left is not None and left.state == "retry"
    assert engine.retrying(MAX_ATTEMPTS, {"later.png"})
    assert not engine.retrying(MAX_ATTEMPTS, {"elsewhere.png"}), "another source's retry held the run open"
    assert engine.retrying(MAX_ATTEMPTS), "without keys every waiting source counts, as the daemon needs"


def test_what_waits_while_the_ledger_cannot_record_a_start_is_shown_waiting(
    engine: Engine, watch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state folder's disk is full: nothing starts, and the queue gauge must not freeze at its last value."""
    for name in ("a.png", "b.png"):
        (watch / name).write_bytes(CONTENT)
        assert engine.offer(Candidate(name, watch / name, "event", time.time()))

    def full(*_args: object, **_kwargs: object) -> int:
        raise PublishError("ledger: database or disk is full", path=engine.ledger.path, stage="ledger")

    monkeypatch.setattr(engine.ledger, "start", full)
    with pytest.raises(PublishError):
        engine.pump(timeout=0.0)
    assert list(engine.pending) == ["a.png", "b.png"]
    assert engine.metrics.registry.get_sample_value("sinkwatch_queue_depth") == 2
    assert engine.metrics.registry.get_sample_value("sinkwatch_in_flight") == 0
