"""A rejected source whose stamp changes while its bytes do not (a touch, a chmod -R, a restore from a backup) is
looked at again, and rejected again, but counted and told once: the rejection counter counts rejected images.

Real files, the engine and a real worker process; the metrics are what the tests read.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path

import pytest
from loguru import logger

from service.engine import Candidate, Engine
from service.file_hash import sha256_file
from service.runner import Job
from tests.conftest import photo_file
from tests.service.conftest import IdleEngine


@pytest.fixture
def engine(watch: Path, idle_engine: IdleEngine) -> Engine:
    return idle_engine(resolve=watch.joinpath)


def run(engine: Engine, path: Path) -> str:
    """Offer the file as a watch event would and run it; its ledger state."""
    assert engine.offer(Candidate(path.name, path, "event", time.time()))
    deadline = time.monotonic() + 120
    while not engine.idle():
        assert time.monotonic() < deadline, "the job did not finish"
        engine.pump(timeout=0.2)
    entry = engine.ledger.get(path.name)
    assert entry is not None
    return entry.state


def rejections(engine: Engine) -> float:
    value = engine.metrics.registry.get_sample_value("sinkwatch_rejections_total", {"reason": "not_image"})
    return value or 0.0


def test_a_rejected_file_whose_stamp_changes_is_not_rejected_anew(engine: Engine, watch: Path) -> None:
    errors: list[str] = []
    sink = logger.add(lambda message: errors.append(message.record["message"]), level="ERROR")
    try:
        path = watch / "notes.png"
        path.write_text("a text file saved under an image's name")
        assert run(engine, path) == "rejected"
        for change in ("touch", "chmod"):
            if change == "touch":
                os.utime(path)
            else:
                os.chmod(path, 0o640)
            assert run(engine, path) == "rejected"
            assert engine.settled([("notes.png", str(path))], source="scan") == {"notes.png"}, (
                "the new stamp is recorded: the next scan leaves it alone"
            )
    finally:
        logger.remove(sink)
    assert rejections(engine) == 1
    assert engine.counts["rejected"] == 1 and engine.counts["skipped"] == 2
    assert len(errors) == 1, errors

    # New bytes are another matter: rejected, and counted, again.
    path.write_text("another text file")
    assert run(engine, path) == "rejected"
    assert rejections(engine) == 2


def test_a_file_rejected_for_its_size_is_tried_again_after_a_touch(engine: Engine, watch: Path) -> None:
    """Not read at all, so not hashed: the README's way to retry it after raising --max-bytes stays a touch."""
    path = watch / "cat.png"
    path.write_bytes(photo_file("chelsea").read_bytes())
    limits = engine.limits
    engine.limits = replace(limits, max_bytes=1000)
    assert run(engine, path) == "rejected"
    engine.limits = limits  # raised again
    os.utime(path)
    assert run(engine, path) == "published"


@pytest.mark.parametrize("reason", ["incomplete", "crashed"])
def test_the_same_bytes_are_not_decoded_again(engine: Engine, watch: Path, reason: str) -> None:
    """A file rejected as cut short would go through every retry again, one that killed its worker (or the whole
    service) would kill it again. Here the bytes are a good photo, so a decode would publish them."""
    path = watch / "cat.png"
    path.write_bytes(photo_file("chelsea").read_bytes())
    st = path.stat()
    engine.ledger.start(
        "cat.png", size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=None, rule="default", fingerprint="f"
    )
    message = f"rejected as {reason} before"
    engine.ledger.rejected("cat.png", reason=reason, message=message, sha256=sha256_file(path))
    os.utime(path)  # a touch

    assert run(engine, path) == "rejected"
    entry = engine.ledger.get("cat.png")
    assert entry is not None and (entry.reason, entry.message) == (reason, message)
    assert not list(engine.queue.glob("*.png")), "decoded and published"
    assert engine.counts["skipped"] == 1 and engine.counts["rejected"] == 0
    assert engine.metrics.registry.get_sample_value("sinkwatch_rejections_total", {"reason": reason}) == 0


def test_a_touched_rejected_file_caught_in_a_worker_death_is_still_not_decoded_again(
    engine: Engine, watch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker died while it was in flight (another image's crash): its retry's ledger row says "retry", no longer
    how it was rejected, and it must still not be decoded again (for an image that killed its worker: run again)."""
    path = watch / "notes.png"
    path.write_text("a text file saved under an image's name")
    assert run(engine, path) == "rejected"
    os.utime(path)  # a touch
    submitted: list[Job] = []

    def submit(job: Job) -> Future[object]:
        submitted.append(job)
        return Future()  # never done: the worker's fate is told below

    monkeypatch.setattr(engine.pool, "submit", submit)
    assert engine.offer(Candidate("notes.png", path, "event", time.time()))
    engine.pump(timeout=0.0)
    [(candidate, job)] = engine.in_flight.values()
    assert job.rejected_as is not None
    engine.in_flight.clear()
    engine._worker_died(candidate, job, alone=False)  # a bystander of another job's crash

    engine.pump(timeout=0.0)
    assert len(submitted) == 2 and submitted[1].rejected_as == job.rejected_as
