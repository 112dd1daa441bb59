"""The ledger's uploads table (service/ledger_uploads.py): generations, order, the pending overflow."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.ledger import MIGRATIONS, SCHEMA_VERSION, Ledger


@pytest.fixture
def clocked(tmp_path: Path) -> Iterator[tuple[Ledger, list[float]]]:
    """A ledger whose clock moves only when the test moves it."""
    now = [100.0]
    (tmp_path / "s").mkdir()
    with Ledger(tmp_path / "s" / "l.sqlite3", clock=lambda: now[0]) as opened:
        yield opened, now


def test_a_version_1_ledger_is_migrated_and_keeps_its_sources(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    with sqlite3.connect(path) as raw:
        for statement in MIGRATIONS[1]:
            raw.execute(statement)
        raw.execute(
            "INSERT INTO sources (relpath, state, attempts, updated) VALUES (?, 'published', 1, 1.0)", (b"a.png",)
        )
        raw.execute("PRAGMA user_version = 1")
    with Ledger(path) as ledger:
        assert getattr(ledger.get("a.png"), "state", None) == "published"
        assert ledger.uploads() == []
        assert ledger.upload_pending("a", relpath="a.png", width=832, height=480) == 1
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_upload_generations_settle_only_their_own_row(ledger: Ledger) -> None:
    assert ledger.upload_pending("a", relpath="a.png", width=832, height=480) == 1
    assert ledger.upload_pending("a", relpath="a.png", width=832, height=480) == 2
    assert not ledger.upload_done("a", generation=1, reference="sinkwatch/a.png")
    assert getattr(ledger.get_upload("a"), "state", None) == "pending"
    assert ledger.upload_done("a", generation=2, reference="sinkwatch/a.png", prompt_id="p")
    assert not ledger.upload_failed("a", generation=2, reason="x", message="settled already")
    upload = ledger.get_upload("a")
    assert upload is not None and (upload.state, upload.prompt_id, upload.reason) == ("done", "p", None)
    assert ledger.upload_pending("a", relpath="a.png", width=480, height=832) == 3
    upload = ledger.get_upload("a")
    assert upload is not None and (upload.state, upload.prompt_id, upload.width) == ("pending", None, 480)


def test_uploads_list_in_the_order_they_were_owed_and_count_by_state(tmp_path: Path) -> None:
    now = [100.0]
    (tmp_path / "s").mkdir()
    with Ledger(tmp_path / "s" / "l.sqlite3", clock=lambda: now[0]) as ledger:
        for name in ("c", "a", "b"):
            ledger.upload_pending(name, relpath=f"{name}.png", width=16, height=16)
            now[0] += 1
        ledger.upload_failed("a", generation=1, reason="comfyui_upload", message="gone")
        assert [u.name for u in ledger.uploads("pending")] == ["c", "b"]
        assert [u.name for u in ledger.uploads()] == ["c", "a", "b"]
        assert ledger.upload_counts() == {"pending": 2, "done": 0, "failed": 1}
        with pytest.raises(ValueError, match="state"):
            ledger.uploads("lost")


def test_undecodable_source_names_round_trip_through_uploads(ledger: Ledger) -> None:
    key = "sub/b\udcffad.png"
    ledger.upload_pending("bad", relpath=key, width=16, height=16)
    assert getattr(ledger.get_upload("bad"), "relpath", None) == key


def test_a_name_republished_while_pending_keeps_its_place_in_line(clocked: tuple[Ledger, list[float]]) -> None:
    ledger, now = clocked
    for name in ("a", "b", "a", "c"):
        ledger.upload_pending(name, relpath=f"{name}.png", width=16, height=16)
        now[0] += 1
    assert [(u.name, u.generation, u.queued) for u in ledger.uploads("pending")] == [
        ("a", 2, 100.0),
        ("b", 1, 101.0),
        ("c", 1, 103.0),
    ]
    ledger.upload_done("a", generation=2, reference="sinkwatch/a.png")
    ledger.upload_pending("a", relpath="a.png", width=16, height=16)  # owed again after it was sent: the back
    assert [u.name for u in ledger.uploads("pending")] == ["b", "c", "a"]


def test_pending_uploads_come_a_page_at_a_time_oldest_first(clocked: tuple[Ledger, list[float]]) -> None:
    ledger, now = clocked
    for name in ("e", "d", "c", "b", "a"):
        ledger.upload_pending(name, relpath=f"{name}.png", width=16, height=16)
        now[0] += 1
    ledger.upload_failed("d", generation=1, reason="comfyui_upload", message="gone")
    assert [u.name for u in ledger.pending_uploads(limit=2)] == ["e", "c"]
    assert [u.name for u in ledger.pending_uploads(limit=10)] == ["e", "c", "b", "a"]
    assert ledger.pending_upload_count() == 4


def test_a_queued_workflow_has_a_waiting_job_until_it_ends_and_a_republication_starts_over(ledger: Ledger) -> None:
    for name in ("a", "b"):
        ledger.upload_pending(name, relpath=f"{name}.png", width=832, height=480)
    assert ledger.upload_done("a", generation=1, reference="sinkwatch/a.png", prompt_id="p1")
    assert ledger.upload_done("b", generation=1, reference="sinkwatch/b.png")  # no workflow: no job
    assert [(u.name, u.job) for u in ledger.uploads()] == [("a", "waiting"), ("b", None)]
    assert [u.name for u in ledger.waiting_jobs(limit=10)] == ["a"]

    assert not ledger.job_ended("a", generation=1, prompt_id="another", job="lost"), "not that job"
    assert ledger.job_ended("a", generation=1, prompt_id="p1", job="error")
    assert not ledger.job_ended("a", generation=1, prompt_id="p1", job="lost"), "ended once"
    assert getattr(ledger.get_upload("a"), "job", None) == "error" and ledger.waiting_jobs(limit=10) == []

    # Republished: the new frame's upload starts with no job, and the old job's end cannot settle the new one.
    assert ledger.upload_pending("a", relpath="a.png", width=832, height=480) == 2
    assert getattr(ledger.get_upload("a"), "job", "?") is None
    assert ledger.upload_done("a", generation=2, reference="sinkwatch/a2.png", prompt_id="p2")
    assert not ledger.job_ended("a", generation=1, prompt_id="p1", job="success")
    assert [(u.name, u.generation, u.prompt_id) for u in ledger.waiting_jobs(limit=10)] == [("a", 2, "p2")]
    with pytest.raises(ValueError, match="job must be one of"):
        ledger.job_ended("a", generation=2, prompt_id="p2", job="waiting")


def test_waiting_jobs_come_the_longest_waiting_first_a_page_at_a_time(clocked: tuple[Ledger, list[float]]) -> None:
    ledger, now = clocked
    for name in ("c", "a", "b", "d"):
        ledger.upload_pending(name, relpath=f"{name}.png", width=16, height=16)
    for name in ("b", "d", "c", "a"):  # queued on ComfyUI in this order
        now[0] += 1
        ledger.upload_done(name, generation=1, reference=f"{name}.png", prompt_id=f"p-{name}")
    assert [u.name for u in ledger.waiting_jobs(limit=3)] == ["b", "d", "c"]
    ledger.job_ended("d", generation=1, prompt_id="p-d", job="success")
    assert [u.name for u in ledger.waiting_jobs(limit=3)] == ["b", "c", "a"]


def test_workflows_queued_before_jobs_were_watched_are_not_watched(tmp_path: Path) -> None:
    """A version 8 ledger knows no job states: its queued workflows may have ended long ago, so none waits."""
    path = tmp_path / "ledger.sqlite3"
    with sqlite3.connect(path) as raw:
        for version in range(1, 9):
            for statement in MIGRATIONS[version]:
                raw.execute(statement)
        raw.execute(
            "INSERT INTO uploads (name, relpath, width, height, state, generation, reference, prompt_id, queued,"
            " updated) VALUES ('a', ?, 832, 480, 'done', 1, 'sinkwatch/a.png', 'p1', 1.0, 2.0)",
            (b"a.png",),
        )
        raw.execute("PRAGMA user_version = 8")
    with Ledger(path) as ledger:
        upload = ledger.get_upload("a")
        assert upload is not None and (upload.state, upload.prompt_id, upload.job) == ("done", "p1", None)
        assert ledger.waiting_jobs(limit=10) == []


def test_a_lost_job_is_owed_again_in_its_place_in_line_and_counted_until_the_frame_is_republished(
    clocked: tuple[Ledger, list[float]],
) -> None:
    ledger, now = clocked
    for name in ("a", "b"):
        ledger.upload_pending(name, relpath=f"{name}.png", width=832, height=480)
        now[0] += 1
    ledger.upload_done("a", generation=1, reference="sinkwatch/a.png", prompt_id="p1")
    ledger.upload_done("b", generation=1, reference="sinkwatch/b.png", prompt_id="q1")
    assert ledger.requeue_job("a", generation=1, prompt_id="other", counted=True) is None, "not that job"

    assert ledger.requeue_job("a", generation=1, prompt_id="p1", counted=True) == 2
    assert ledger.requeue_job("a", generation=1, prompt_id="p1", counted=True) is None, "once"
    upload = ledger.get_upload("a")
    assert upload is not None
    assert (upload.state, upload.generation, upload.prompt_id, upload.job, upload.requeued) == (
        "pending",
        2,
        None,
        None,
        1,
    )
    assert [u.name for u in ledger.pending_uploads(limit=10)] == ["a"] and upload.queued == 100.0, "first in line"
    assert ledger.requeue_job("b", generation=1, prompt_id="q1", counted=False) == 2
    assert getattr(ledger.get_upload("b"), "requeued", None) == 0, "not counted"

    ledger.upload_done("a", generation=2, reference="sinkwatch/a.png", prompt_id="p2")
    assert getattr(ledger.get_upload("a"), "requeued", None) == 1, "sent again, still counted"
    ledger.job_ended("a", generation=2, prompt_id="p2", job="success")
    assert ledger.requeue_job("a", generation=2, prompt_id="p2", counted=True) is None, "only a waiting job"
    ledger.upload_pending("a", relpath="a.png", width=832, height=480)  # a new frame: its jobs start over
    assert getattr(ledger.get_upload("a"), "requeued", None) == 0
