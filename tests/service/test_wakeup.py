"""A watch event ends the engine's wait at once: a file closed while the loop waits is not left for
the rest of the tick. (The waits below are 60 s long; the tests only check that they end early at all.)"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from pathlib import Path

import pytest
from watchdog.events import FileClosedEvent, FileModifiedEvent

from service.engine import Candidate, Engine
from service.runner import Job
from service.watcher import EnqueueHandler, EventQueue
from tests.service.conftest import IdleEngine

LONG_WAIT = 60.0


def test_the_first_event_after_a_rearm_completes_the_signal_and_a_rearm_makes_a_fresh_one() -> None:
    events = EventQueue(maxsize=1)
    handler = EnqueueHandler(events)
    first = events.arrived()
    assert not first.done()
    handler.dispatch(FileClosedEvent("/watch/a.png"))
    assert first.done() and events.arrived() is first
    events.rearm()
    second = events.arrived()
    assert second is not first and not second.done()
    events.rearm()
    assert events.arrived() is second, "an unfired signal is kept: an event put meanwhile must not be lost"
    handler.dispatch(FileModifiedEvent("/watch/b.png"))  # the queue is full: dropped, but still a wake-up
    assert events.overflowed and second.done()


@pytest.fixture
def engine(tmp_path: Path, idle_engine: IdleEngine) -> tuple[Engine, EventQueue]:
    events = EventQueue(maxsize=8)
    return idle_engine(resolve=lambda key: tmp_path / key, wakeup=events.arrived), events


def _collect_in_thread(engine: Engine) -> threading.Thread:
    thread = threading.Thread(target=engine._collect, args=(LONG_WAIT,), daemon=True)
    thread.start()
    return thread


def test_an_idle_wait_ends_when_an_event_arrives(engine: tuple[Engine, EventQueue]) -> None:
    work, events = engine
    waiting = _collect_in_thread(work)
    waiting.join(0.2)
    assert waiting.is_alive(), "the idle wait ended with nothing to wake it"
    EnqueueHandler(events).dispatch(FileClosedEvent("/watch/a.png"))
    waiting.join(LONG_WAIT / 2)
    assert not waiting.is_alive(), "the event did not end the idle wait"


def test_a_wait_for_running_jobs_ends_when_an_event_arrives(engine: tuple[Engine, EventQueue], tmp_path: Path) -> None:
    work, events = engine
    rule = work.rules.get("default")
    job = Job(source=tmp_path / "a.png", key="a.png", name="a", rule=rule, queue=tmp_path, max_bytes=1, max_pixels=1)
    running: Future[object] = Future()  # a job that never finishes
    work.in_flight[running] = (Candidate("a.png", tmp_path / "a.png", "event", 0.0), job)  # type: ignore[index]
    waiting = _collect_in_thread(work)
    waiting.join(0.2)
    assert waiting.is_alive(), "the wait for the running job ended with nothing to wake it"
    EnqueueHandler(events).dispatch(FileClosedEvent("/watch/b.png"))
    waiting.join(LONG_WAIT / 2)
    assert not waiting.is_alive(), "the event did not end the wait for the running job"
    assert running in work.in_flight, "the unfinished job was treated as done"
