"""How the video jobs queued on ComfyUI end, as the daemon's looks see them (service/comfyui_jobs.py).

In-process against the loopback fake, set to run a queued prompt only when told (``run_queued``), which shows
the first one waiting as running and forgets its queue and history as a restarted ComfyUI does (``restart``),
with a real Ledger and Publisher.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import pytest

from service.comfyui import ComfyClient
from service.comfyui_jobs import FAILED_LOOKS_SAID, JobWatch
from service.errors import PublishError
from service.ledger import Ledger
from service.metrics import Metrics
from service.publish import Publisher
from service.uploader import Uploads
from service.workflow import load_workflow
from tests.conftest import wait_for
from tests.fake_comfyui import FakeComfyUI
from tests.service.test_uploader import SMOKE, messages, publish, settle, value

if TYPE_CHECKING:
    from loguru import Record

JOBS = "sinkwatch_comfyui_jobs_total"
EVERY = 0.02  # seconds between looks


class Pumped(Protocol):
    def pump(self) -> object: ...


def until(pumped: Pumped, condition: Callable[[], bool]) -> None:
    """Pump until `condition` holds."""

    def check() -> bool:
        pumped.pump()
        return condition()

    wait_for(check, timeout=30, interval=EVERY / 2)


def queue_frames(uploads: Uploads, publisher: Publisher, ledger: Ledger, photos: dict[str, str]) -> dict[str, str]:
    """Publish each frame and send it until ComfyUI queued its workflow; returns name -> prompt_id."""
    for name, photo in photos.items():
        publish(publisher, name, photo)
        uploads.enqueue(name, f"{name}.png", 832, 480)
    settle(uploads, ledger, list(photos))
    return {name: str(getattr(ledger.get_upload(name), "prompt_id", None)) for name in photos}


def jobs(ledger: Ledger) -> dict[str, str | None]:
    return {upload.name: upload.job for upload in ledger.uploads()}


def queue_looks(comfy: FakeComfyUI) -> int:
    return comfy.requests.count(("GET", "/queue"))


def history_looks(comfy: FakeComfyUI, prompt_id: str) -> int:
    return comfy.requests.count(("GET", f"/history/{prompt_id}"))


@pytest.fixture(autouse=True)
def run_when_told(comfy: FakeComfyUI) -> None:
    """The fake otherwise runs a prompt once its history has been asked for: here only `run_queued` runs one."""
    comfy.pending_polls = 10**9


@pytest.fixture
def sender(comfy: FakeComfyUI, make_uploads: Callable[..., Uploads]) -> Uploads:
    """Uploads that queue the smoke workflow and do not watch its jobs, as `sinkwatch process` does."""
    return make_uploads(comfy.url, workflow=load_workflow(SMOKE))


@pytest.fixture
def watching(comfy: FakeComfyUI, make_uploads: Callable[..., Uploads]) -> Uploads:
    """Uploads that queue the smoke workflow and look at its jobs every EVERY seconds, as the daemon does."""
    return make_uploads(comfy.url, workflow=load_workflow(SMOKE), check_jobs_every=EVERY)


@pytest.fixture
def make_watch(comfy: FakeComfyUI, ledger: Ledger, metrics: Metrics) -> Iterator[Callable[..., JobWatch]]:
    made: list[JobWatch] = []

    def make(*, every: float, running_every: float, **requeue: Any) -> JobWatch:
        client = ComfyClient(comfy.url, timeout=5.0)
        made.append(
            JobWatch(client=client, ledger=ledger, metrics=metrics, every=every, running_every=running_every, **requeue)
        )
        return made[-1]

    yield make
    for watch in made:
        watch.close(timeout=10)


def test_a_running_job_is_looked_at_closely_and_its_end_brings_the_next_full_look_forward(
    comfy: FakeComfyUI, sender: Uploads, make_watch: Callable[..., JobWatch], ledger: Ledger, publisher: Publisher
) -> None:
    """Its end is seen within RUNNING_EVERY, not at the next full look: a restart of ComfyUI soon after the end
    would otherwise wipe it from the history and make it pass for lost."""
    prompts = queue_frames(sender, publisher, ledger, {"a": "astronaut", "b": "chelsea"})
    watch = make_watch(every=60.0, running_every=EVERY)
    until(watch, lambda: history_looks(comfy, prompts["a"]) >= 2)
    assert (queue_looks(comfy), history_looks(comfy, prompts["b"])) == (1, 0), "one full look; b waits behind a"
    assert jobs(ledger) == {"a": "waiting", "b": "waiting"}

    comfy.run_queued(count=1)
    until(watch, lambda: jobs(ledger)["a"] == "success")
    until(watch, lambda: queue_looks(comfy) == 2)  # at once, not 60 s after the first
    until(watch, lambda: history_looks(comfy, prompts["b"]) >= 2)  # b runs now
    comfy.restart()
    until(watch, lambda: history_looks(comfy, prompts["b"]) >= 4)
    assert jobs(ledger) == {"a": "success", "b": "waiting"}, "a quick look cannot tell a lost job: it waits"


def test_jobs_a_comfyui_restart_dropped_are_reported_lost_frame_by_frame_and_not_queued_again(
    comfy: FakeComfyUI, watching: Uploads, ledger: Ledger, publisher: Publisher, metrics: Metrics, logs: list[Record]
) -> None:
    prompts = queue_frames(watching, publisher, ledger, {"a": "astronaut", "b": "chelsea", "c": "coffee"})
    comfy.restart()
    until(watching, lambda: set(jobs(ledger).values()) == {"lost"})

    assert (value(metrics, JOBS, "lost"), value(metrics, JOBS, "unknown")) == (3, 0)
    warnings = messages(logs, "WARNING")
    for name, prompt_id in prompts.items():
        assert [m for m in warnings if f"lost the video job for {name} (prompt {prompt_id})" in m], warnings
    looked = queue_looks(comfy)
    until(watching, lambda: queue_looks(comfy) == looked)  # no job waits: no more looks
    assert len(comfy.prompts) == 3, "a lost job is reported, not queued again"


def test_jobs_queued_before_this_daemon_that_comfyui_forgot_are_unknown_and_those_it_saw_waiting_are_lost(
    comfy: FakeComfyUI,
    sender: Uploads,
    make_uploads: Callable[..., Uploads],
    ledger: Ledger,
    publisher: Publisher,
    metrics: Metrics,
    logs: list[Record],
) -> None:
    queue_frames(sender, publisher, ledger, {"a": "astronaut", "b": "chelsea"})
    comfy.restart()  # while no daemon watched: a and b may have run, or not; nobody can tell now
    queue_frames(sender, publisher, ledger, {"c": "coffee"})
    sender.close()
    assert queue_looks(comfy) == 0, "a run that ends does not look"

    daemon = make_uploads(comfy.url, workflow=load_workflow(SMOKE), check_jobs_every=EVERY)
    # Its first look finds c in the queue: from then on this daemon has seen it.
    until(daemon, lambda: jobs(ledger) == {"a": "unknown", "b": "unknown", "c": "waiting"})
    comfy.restart()
    until(daemon, lambda: jobs(ledger)["c"] == "lost")

    assert (value(metrics, JOBS, "unknown"), value(metrics, JOBS, "lost")) == (2, 1)
    said = [m for m in messages(logs, "INFO") if "no longer knows 2 video jobs" in m]
    assert len(said) == 1 and "(a, b)" in said[0], messages(logs, "INFO")
    assert not [m for m in messages(logs, "WARNING") if "for a " in m or "for b " in m]


def test_a_job_that_failed_in_comfyui_is_logged_with_comfyuis_message(
    comfy: FakeComfyUI, watching: Uploads, ledger: Ledger, publisher: Publisher, metrics: Metrics, logs: list[Record]
) -> None:
    prompt_id = queue_frames(watching, publisher, ledger, {"a": "astronaut"})["a"]
    reference = getattr(ledger.get_upload("a"), "reference", None)
    assert reference is not None
    (comfy.input_dir / reference).unlink()  # LoadImage finds no file when the job runs
    comfy.run_queued()
    until(watching, lambda: jobs(ledger) == {"a": "error"})

    assert value(metrics, JOBS, "error") == 1
    failed = [m for m in messages(logs, "WARNING") if f"video job for a failed (prompt {prompt_id})" in m]
    assert len(failed) == 1 and "FileNotFoundError" in failed[0] and "(in LoadImage)" in failed[0], failed


def test_a_job_cancelled_in_comfyui_is_interrupted_not_failed(
    comfy: FakeComfyUI, watching: Uploads, ledger: Ledger, publisher: Publisher, metrics: Metrics, logs: list[Record]
) -> None:
    queue_frames(watching, publisher, ledger, {"a": "astronaut"})
    comfy.interrupt()
    until(watching, lambda: jobs(ledger) == {"a": "interrupted"})

    assert (value(metrics, JOBS, "interrupted"), value(metrics, JOBS, "error")) == (1, 0)
    assert [m for m in messages(logs, "INFO") if "video job for a was interrupted" in m]
    assert not messages(logs, "WARNING")


def test_looks_comfyui_does_not_answer_change_nothing_and_several_in_a_row_are_said_once(
    comfy: FakeComfyUI, watching: Uploads, ledger: Ledger, publisher: Publisher, metrics: Metrics, logs: list[Record]
) -> None:
    queue_frames(watching, publisher, ledger, {"a": "astronaut"})
    failing = FAILED_LOOKS_SAID + 2
    comfy.fail_next(500, count=failing, path="/queue")
    until(watching, lambda: any("answers about its video jobs again" in m for m in messages(logs, "INFO")))

    assert len([m for m in messages(logs, "DEBUG") if m.startswith("could not look at ComfyUI's video")]) == failing - 1
    warned = [m for m in messages(logs, "WARNING") if "could not look at ComfyUI's video jobs" in m]
    assert len(warned) == 1 and f"{FAILED_LOOKS_SAID} times in a row" in warned[0], messages(logs, "WARNING")
    assert not messages(logs, "ERROR")
    assert jobs(ledger) == {"a": "waiting"} and sum(value(metrics, JOBS, o) for o in ("lost", "unknown")) == 0
    comfy.run_queued()
    until(watching, lambda: jobs(ledger) == {"a": "success"})


def test_a_job_whose_history_comfyui_cannot_answer_does_not_hold_up_the_jobs_behind_it(
    comfy: FakeComfyUI, watching: Uploads, ledger: Ledger, publisher: Publisher, logs: list[Record]
) -> None:
    prompts = queue_frames(watching, publisher, ledger, {"a": "astronaut", "b": "chelsea"})
    comfy.run_queued()
    comfy.fail_next(500, count=10**6, path=f"/history/{prompts['a']}")  # looked at first: it waits longest
    until(watching, lambda: jobs(ledger) == {"a": "waiting", "b": "success"})
    until(watching, lambda: any("could not look at ComfyUI's video jobs" in m for m in messages(logs, "WARNING")))
    assert history_looks(comfy, prompts["a"]) >= FAILED_LOOKS_SAID


def test_asked_lost_jobs_are_queued_again_the_suspect_last_and_counted_until_each_frame_used_its_share(
    comfy: FakeComfyUI,
    make_uploads: Callable[..., Uploads],
    ledger: Ledger,
    publisher: Publisher,
    metrics: Metrics,
    logs: list[Record],
) -> None:
    """Say every job takes ComfyUI down: each restart counts against the frame whose job ran (the longest
    waiting), the others come back uncounted, and with one re-queue each both frames end up lost, 5 re-queues on."""
    uploads = make_uploads(comfy.url, workflow=load_workflow(SMOKE), check_jobs_every=EVERY, requeue_lost=1)
    first = queue_frames(uploads, publisher, ledger, {"a": "astronaut", "b": "chelsea"})
    images = {name: str(getattr(ledger.get_upload(name), "reference", "")) for name in first}
    # After each restart: the jobs found lost so far, and the prompts ComfyUI has taken.
    for lost, prompts in ((2, 4), (4, 6), (6, 7), (7, 7)):
        comfy.restart()

        def found_lost(lost: int = lost) -> bool:
            return value(metrics, JOBS, "lost") == lost

        def sent_again(prompts: int = prompts) -> bool:
            return len(comfy.prompts) == prompts and not ledger.pending_uploads(limit=1)

        until(uploads, found_lost)
        until(uploads, sent_again)
        if prompts == 4:
            again = {upload.name: upload.prompt_id for upload in ledger.uploads()}
            assert all(again[name] not in (None, first[name]) for name in again), "a new job, under a new prompt_id"
            order = [p["1"]["inputs"]["image"] for p in comfy.prompts[2:]]
            assert order == [images["b"], images["a"]], "a's job ran (it waited longest): it goes back last"
            assert {u.name: u.requeued for u in ledger.uploads()} == {"a": 1, "b": 0}

    assert jobs(ledger) == {"a": "lost", "b": "lost"} and {u.name: u.requeued for u in ledger.uploads()} == {
        "a": 1,
        "b": 1,
    }
    assert value(metrics, JOBS, "lost") == 7
    said = [m.split("; ")[-1] for m in messages(logs, "WARNING") if "lost the video job for" in m]
    assert said.count("queuing it again (1 of 1)") == 2, said
    assert said.count("not queued again (1 of 1 done already)") == 2, said
    assert len([m for m in said if m.startswith("queuing it again, not counted: the job of ")]) == 3, said


def test_a_lost_job_whose_requeue_the_ledger_cannot_write_waits_and_is_queued_again_at_the_next_look(
    comfy: FakeComfyUI,
    make_uploads: Callable[..., Uploads],
    ledger: Ledger,
    publisher: Publisher,
    metrics: Metrics,
    logs: list[Record],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uploads = make_uploads(comfy.url, workflow=load_workflow(SMOKE), check_jobs_every=EVERY, requeue_lost=1)
    queue_frames(uploads, publisher, ledger, {"a": "astronaut"})
    requeue_job = ledger.requeue_job
    failures: list[PublishError] = []

    def full_disk_once(name: str, **kwargs: Any) -> int | None:
        if not failures:
            failures.append(PublishError("ledger: database or disk is full", stage="ledger"))
            raise failures[0]
        return requeue_job(name, **kwargs)

    monkeypatch.setattr(ledger, "requeue_job", full_disk_once)
    comfy.restart()
    with pytest.raises(PublishError, match="disk is full"):
        until(uploads, lambda: False)  # the pump raises it, as the daemon's loop expects of a ledger write
    assert jobs(ledger) == {"a": "waiting"} and value(metrics, JOBS, "lost") == 0, "nothing recorded, nothing said"

    until(uploads, lambda: len(comfy.prompts) == 2 and jobs(ledger) == {"a": "waiting"})
    assert value(metrics, JOBS, "lost") == 1
    said = [m for m in messages(logs, "WARNING") if "lost the video job for a " in m]
    assert len(said) == 1 and said[0].endswith("queuing it again (1 of 1)"), said
