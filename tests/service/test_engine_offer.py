"""Engine.offer, one file at a time: which files it leaves alone (see `service.unchanged`).

Real ledger and engine; nothing is dispatched, the pending queue is what the tests read.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.engine import Candidate, Engine
from tests.service.conftest import IdleEngine, file_stamp

CONTENT = b"the engine judges size and mtime, it never reads a file here"


@pytest.fixture
def engine(watch: Path, idle_engine: IdleEngine) -> Engine:
    return idle_engine(resolve=lambda key: watch / key)


def recorded(engine: Engine, watch: Path, name: str, state: str) -> Path:
    path = watch / name
    path.write_bytes(CONTENT)
    stamp = file_stamp(path)
    engine.ledger.start(name, **stamp, sha256=None, rule="default", fingerprint="f")
    if state == "published":
        engine.ledger.published(name, **stamp, sha256="0" * 64, rule="default", fingerprint="f")
    elif state == "rejected":
        engine.ledger.rejected(name, reason="bomb", message="")
    elif state == "retry":
        engine.ledger.retry(name, reason="incomplete", message="", next_attempt=1e12)
    return path


@pytest.mark.parametrize(
    ("state", "source", "taken"),
    [
        ("published", "event", False),
        ("published", "retry", False),
        ("rejected", "scan", False),
        ("retry", "event", False),  # unchanged: its scheduled retry will come
        ("retry", "scan", False),
        ("retry", "retry", True),
        ("processing", "event", True),  # left by a run that died
    ],
)
def test_an_unchanged_file_is_taken_by_its_state_and_who_found_it(
    engine: Engine, watch: Path, state: str, source: str, taken: bool
) -> None:
    path = recorded(engine, watch, "a.png", state)
    engine.offer(Candidate("a.png", path, source, 0.0))
    assert ("a.png" in engine.pending) is taken


@pytest.mark.parametrize("state", ["published", "rejected", "retry"])
@pytest.mark.parametrize("change", ["size", "mtime"])
def test_a_changed_file_is_taken_whatever_its_state(engine: Engine, watch: Path, state: str, change: str) -> None:
    path = recorded(engine, watch, "a.png", state)
    if change == "size":
        path.write_bytes(CONTENT + b"!")
    else:
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    engine.offer(Candidate("a.png", path, "event", 0.0))
    assert "a.png" in engine.pending


def test_a_new_file_is_taken_and_a_missing_or_irregular_one_is_not(engine: Engine, watch: Path) -> None:
    (watch / "new.png").write_bytes(CONTENT)
    (watch / "folder.png").mkdir()
    for name in ("new.png", "gone.png", "folder.png"):
        engine.offer(Candidate(name, watch / name, "event", 0.0))
    assert list(engine.pending) == ["new.png"]
