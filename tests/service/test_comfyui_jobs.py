"""How the video jobs queued on ComfyUI end, as the daemon's checks see them (service/comfyui_jobs.py).

In-process against the loopback fake, which runs a queued prompt only when told (``run_queued``) and forgets its
queue and history as a restarted ComfyUI does (``restart``), with a real Ledger and Publisher.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from service.ledger import Ledger
from service.metrics import Metrics
from service.publish import Publisher
from service.uploader import Uploads
from service.workflow import load_workflow
from tests.fake_comfyui import FakeComfyUI
from tests.service.test_uploader import SMOKE, messages, publish, pump_until, settle, value

if TYPE_CHECKING:
    from loguru import Record

JOBS = "sinkwatch_comfyui_jobs_total"
EVERY = 0.02  # seconds between checks


def queue_frames(uploads: Uploads, publisher: Publisher, ledger: Ledger, photos: dict[str, str]) -> dict[str, str]:
    """Publish each frame and send it until ComfyUI queued its workflow; returns name -> prompt_id."""
    for name, photo in photos.items():
        publish(publisher, name, photo)
        uploads.enqueue(name, f"{name}.png", 832, 480)
    settle(uploads, ledger, list(photos))
    return {name: str(getattr(ledger.get_upload(name), "prompt_id", None)) for name in photos}


def jobs(ledger: Ledger) -> dict[str, str | None]:
    return {upload.name: upload.job for upload in ledger.uploads()}


def pump_for(uploads: Uploads, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        uploads.pump()
        time.sleep(EVERY / 2)


def queue_asks(comfy: FakeComfyUI) -> int:
    return comfy.requests.count(("GET", "/queue"))


def test_a_job_comfyui_ran_is_seen_to_end_once_and_then_no_longer_asked_about(
    comfy: FakeComfyUI, make_uploads: Callable[..., Uploads], ledger: Ledger, publisher: Publisher, metrics: Metrics
) -> None:
    uploads = make_uploads(comfy.url, workflow=load_workflow(SMOKE), check_jobs_every=EVERY)
    queue_frames(uploads, publisher, ledger, {"a": "astronaut"})
    assert jobs(ledger) == {"a": "waiting"}

    pump_until(uploads, lambda: queue_asks(comfy) >= 3)
    assert jobs(ledger) == {"a": "waiting"}, "in ComfyUI's queue: still waiting"
    assert not [path for _method, path in comfy.requests if path.startswith("/history/")], "no history while queued"

    comfy.run_queued()
    pump_until(uploads, lambda: jobs(ledger) == {"a": "success"})
    assert value(metrics, JOBS, "success") == 1
    asked = len(comfy.requests)
    pump_for(uploads, 10 * EVERY)
    assert comfy.requests[asked:] == [], "nothing waits, nothing is asked"
    assert value(metrics, JOBS, "success") == 1


def test_jobs_a_comfyui_restart_dropped_are_reported_lost_frame_by_frame_and_not_queued_again(
    comfy: FakeComfyUI,
    make_uploads: Callable[..., Uploads],
    ledger: Ledger,
    publisher: Publisher,
    metrics: Metrics,
    logs: list[Record],
) -> None:
    uploads = make_uploads(comfy.url, workflow=load_workflow(SMOKE), check_jobs_every=EVERY)
    prompts = queue_frames(uploads, publisher, ledger, {"a": "astronaut", "b": "chelsea", "c": "coffee"})
    comfy.restart()
    pump_until(uploads, lambda: set(jobs(ledger).values()) == {"lost"})

    assert (value(metrics, JOBS, "lost"), value(metrics, JOBS, "unknown")) == (3, 0)
    warnings = messages(logs, "WARNING")
    for name, prompt_id in prompts.items():
        assert [m for m in warnings if f"lost the video job for {name} (prompt {prompt_id})" in m], warnings
    pump_for(uploads, 5 * EVERY)
    assert len(comfy.prompts) == 3, "a lost job is reported, not queued again"
    assert value(metrics, JOBS, "lost") == 3


def test_jobs_queued_before_this_daemon_that_comfyui_forgot_are_unknown_and_those_it_saw_waiting_are_lost(
    comfy: FakeComfyUI,
    make_uploads: Callable[..., Uploads],
    ledger: Ledger,
    publisher: Publisher,
    metrics: Metrics,
    logs: list[Record],
) -> None:
    # Runs that end (`process`) queue jobs and do not watch them.
    ended_run = make_uploads(comfy.url, workflow=load_workflow(SMOKE))
    queue_frames(ended_run, publisher, ledger, {"a": "astronaut", "b": "chelsea"})
    comfy.restart()  # while no daemon watched: a and b may have run, or not; nobody can tell now
    queue_frames(ended_run, publisher, ledger, {"c": "coffee"})
    ended_run.close()
    assert queue_asks(comfy) == 0

    daemon = make_uploads(comfy.url, workflow=load_workflow(SMOKE), check_jobs_every=EVERY)
    # Its first check finds c waiting: from then on this daemon has seen it.
    pump_until(daemon, lambda: jobs(ledger) == {"a": "unknown", "b": "unknown", "c": "waiting"})
    comfy.restart()
    pump_until(daemon, lambda: jobs(ledger)["c"] == "lost")

    assert (value(metrics, JOBS, "unknown"), value(metrics, JOBS, "lost")) == (2, 1)
    said = [m for m in messages(logs, "INFO") if "no longer knows 2 video jobs" in m]
    assert len(said) == 1 and "(a, b)" in said[0], messages(logs, "INFO")
    assert not [m for m in messages(logs, "WARNING") if "for a " in m or "for b " in m]


def test_a_job_that_failed_in_comfyui_is_logged_with_comfyuis_message(
    comfy: FakeComfyUI,
    make_uploads: Callable[..., Uploads],
    ledger: Ledger,
    publisher: Publisher,
    metrics: Metrics,
    logs: list[Record],
) -> None:
    uploads = make_uploads(comfy.url, workflow=load_workflow(SMOKE), check_jobs_every=EVERY)
    prompt_id = queue_frames(uploads, publisher, ledger, {"a": "astronaut"})["a"]
    reference = getattr(ledger.get_upload("a"), "reference", None)
    assert reference is not None
    (comfy.input_dir / reference).unlink()  # LoadImage finds no file when the job runs
    comfy.run_queued()
    pump_until(uploads, lambda: jobs(ledger) == {"a": "error"})

    assert value(metrics, JOBS, "error") == 1
    failed = [m for m in messages(logs, "WARNING") if f"video job for a failed (prompt {prompt_id})" in m]
    assert len(failed) == 1 and "FileNotFoundError" in failed[0] and "(in LoadImage)" in failed[0], failed


def test_a_check_comfyui_does_not_answer_changes_nothing_and_is_made_again(
    comfy: FakeComfyUI,
    make_uploads: Callable[..., Uploads],
    ledger: Ledger,
    publisher: Publisher,
    metrics: Metrics,
    logs: list[Record],
) -> None:
    uploads = make_uploads(comfy.url, workflow=load_workflow(SMOKE), check_jobs_every=EVERY)
    queue_frames(uploads, publisher, ledger, {"a": "astronaut"})
    comfy.fail_next(500, count=2, path="/queue")
    comfy.run_queued()
    pump_until(uploads, lambda: jobs(ledger) == {"a": "success"})

    assert queue_asks(comfy) >= 3, "two checks failed, a third one saw the job end"
    assert value(metrics, JOBS, "success") == 1 and value(metrics, JOBS, "lost") == 0
    assert len([m for m in messages(logs, "DEBUG") if m.startswith("could not ask ComfyUI about its video jobs")]) == 2
    assert not messages(logs, "WARNING") and not messages(logs, "ERROR")
