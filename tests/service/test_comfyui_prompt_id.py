"""A workflow is queued once per frame, even when ComfyUI queues it and its answer is lost on the way back."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from service.comfyui import ComfyClient, QueuedPrompt
from service.ledger import Ledger
from service.metrics import Metrics
from service.publish import Publisher
from service.upload_sender import prompt_id_for
from service.uploader import Uploads
from service.workflow import load_workflow, prepare
from tests.conftest import wait_for
from tests.fake_comfyui import FakeComfyUI
from tests.service.test_uploader import png_of, publish, pump_until, settle, sidecar, value

SMOKE = Path(__file__).resolve().parents[2] / "deploy" / "comfyui" / "loadimage-save-api.json"
# A timeout the fake's other answers meet with room to spare, and a /prompt answer that comes well after it
# (the test does not wait for it: closing the fake ends the wait).
SHORT_TIMEOUT = 1.0
LATE = 5.0
PROMPTS = "sinkwatch_comfyui_prompts_total"


def smoke_prompt(image: str) -> dict[str, Any]:
    return prepare(load_workflow(SMOKE), image=image, width=832, height=480)


@pytest.fixture
def start_uploads(
    comfy: FakeComfyUI, ledger: Ledger, publisher: Publisher, metrics: Metrics
) -> Iterator[Callable[..., Uploads]]:
    """Uploads with the smoke workflow and the given request timeout, retrying at once unless told; closed after
    the test."""
    made: list[Uploads] = []

    def start(*, timeout: float = 5.0, retry_base: float = 0.001, retry_cap: float = 0.01) -> Uploads:
        made.append(
            Uploads(
                client=ComfyClient(comfy.url, timeout=timeout),
                ledger=ledger,
                publisher=publisher,
                metrics=metrics,
                workflow=load_workflow(SMOKE),
                retry_base=retry_base,
                retry_cap=retry_cap,
            )
        )
        return made[-1]

    yield start
    for uploads in made:
        uploads.close()


def send(uploads: Uploads, ledger: Ledger, publisher: Publisher, name: str) -> str:
    """Publish frame `name`, owe it to ComfyUI, pump until the ledger settles it; returns its prompt_id."""
    publish(publisher, name, "astronaut")
    uploads.enqueue(name, f"{name}.png", 832, 480)
    settle(uploads, ledger, [name])
    upload = ledger.get_upload(name)
    assert upload is not None and upload.state == "done" and upload.prompt_id is not None
    assert sidecar(publisher, name)["comfyui"]["prompt_id"] == upload.prompt_id
    return upload.prompt_id


# -- the client ----------------------------------------------------------------------------------


def test_comfyui_queues_a_prompt_under_the_id_the_client_chose(comfy: FakeComfyUI) -> None:
    client = ComfyClient(comfy.url)
    client.upload_image(png_of("astronaut"), name="a.png")
    queued = client.submit(smoke_prompt("sinkwatch/a.png"), prompt_id="sinkwatch-chosen-id")
    assert queued.prompt_id == "sinkwatch-chosen-id"
    assert client.wait("sinkwatch-chosen-id", timeout=10, poll=0.01) == "success"


def test_find_sees_a_prompt_running_waiting_and_finished_and_nothing_else(comfy: FakeComfyUI) -> None:
    client = ComfyClient(comfy.url)
    client.upload_image(png_of("astronaut"), name="a.png")
    prompt = smoke_prompt("sinkwatch/a.png")
    client.submit(prompt, prompt_id="first")
    client.submit(prompt, prompt_id="second")
    assert client.find("first") == QueuedPrompt(prompt_id="first", number=0.0), "running"
    assert client.find("second") == QueuedPrompt(prompt_id="second", number=1.0), "waiting"
    assert client.find("other") is None
    assert client.wait("first", timeout=10, poll=0.01) == "success"
    assert ("GET", "/queue") in comfy.requests
    assert client.find("first") == QueuedPrompt(prompt_id="first", number=0.0), "finished: in the history"


def test_the_prompt_id_is_the_same_for_each_try_and_differs_for_anything_else() -> None:
    prompt = smoke_prompt("sinkwatch/a.png")
    sha = hashlib.sha256(b"frame").hexdigest()
    first = prompt_id_for(prompt, generation=1, frame_sha256=sha)
    assert prompt_id_for(smoke_prompt("sinkwatch/a.png"), generation=1, frame_sha256=sha) == first
    others = [
        prompt_id_for(prompt, generation=2, frame_sha256=sha),  # republished, or sent again on purpose
        prompt_id_for(prompt, generation=1, frame_sha256=hashlib.sha256(b"other").hexdigest()),  # a fresh ledger
        prompt_id_for(smoke_prompt("other/a.png"), generation=1, frame_sha256=sha),  # another subfolder
    ]
    assert len({first, *others}) == 4


# -- the sender ----------------------------------------------------------------------------------


def test_a_prompt_answered_after_the_timeout_is_found_queued_not_sent_again(
    comfy: FakeComfyUI, start_uploads: Callable[..., Uploads], ledger: Ledger, publisher: Publisher, metrics: Metrics
) -> None:
    comfy.answer_prompts_late(LATE)
    prompt_id = send(start_uploads(timeout=SHORT_TIMEOUT), ledger, publisher, "a")

    assert len(comfy.prompts) == 1, "the workflow was queued twice"
    assert value(metrics, PROMPTS, "retried") >= 1 and value(metrics, PROMPTS, "queued") == 1
    assert ComfyClient(comfy.url).wait(prompt_id, timeout=10, poll=0.01) == "success", "the id ComfyUI has"


def test_a_prompt_comfyui_failed_before_queueing_is_looked_for_then_sent_again(
    comfy: FakeComfyUI, start_uploads: Callable[..., Uploads], ledger: Ledger, publisher: Publisher, metrics: Metrics
) -> None:
    comfy.fail_next(500, path="/prompt")
    prompt_id = send(start_uploads(), ledger, publisher, "a")

    assert len(comfy.prompts) == 1
    assert comfy.requests[1:] == [
        ("POST", "/prompt"),
        ("GET", "/queue"),
        ("GET", f"/history/{prompt_id}"),
        ("POST", "/prompt"),
    ]
    assert value(metrics, PROMPTS, "retried") == 1
    assert ComfyClient(comfy.url).wait(prompt_id, timeout=10, poll=0.01) == "success"


def test_the_first_try_asks_nothing_before_it_sends(
    comfy: FakeComfyUI, start_uploads: Callable[..., Uploads], ledger: Ledger, publisher: Publisher
) -> None:
    send(start_uploads(), ledger, publisher, "a")
    assert [path for _method, path in comfy.requests] == ["/upload/image", "/prompt"]


def test_a_run_stopped_while_an_unanswered_prompt_waits_to_be_tried_again_does_not_queue_it_twice_at_restart(
    comfy: FakeComfyUI, start_uploads: Callable[..., Uploads], ledger: Ledger, publisher: Publisher, metrics: Metrics
) -> None:
    # ComfyUI queues the workflow but answers too late; the run stops during the backoff before its next try.
    comfy.answer_prompts_late(LATE)
    first = start_uploads(timeout=SHORT_TIMEOUT, retry_base=60.0, retry_cap=60.0)
    publish(publisher, "a", "astronaut")
    first.enqueue("a", "a.png", 832, 480)
    pump_until(first, lambda: value(metrics, PROMPTS, "retried") == 1)
    first.close()
    assert len(comfy.prompts) == 1
    restart_queues_nothing_again(comfy, start_uploads, ledger)


def test_a_run_killed_after_comfyui_queued_the_prompt_before_it_recorded_that_does_not_queue_it_twice_at_restart(
    comfy: FakeComfyUI, start_uploads: Callable[..., Uploads], ledger: Ledger, publisher: Publisher
) -> None:
    """ComfyUI answered; the daemon was killed before its main thread applied the answer (SIGKILL, the OOM
    killer, systemd's stop timeout): the ledger row is still pending. ComfyUI does not refuse a prompt_id it
    already holds, so sending the workflow again would render the video twice."""
    killed = start_uploads()
    publish(publisher, "a", "astronaut")
    killed.enqueue("a", "a.png", 832, 480)
    pump_until(killed, lambda: bool(comfy.prompts) or getattr(ledger.get_upload("a"), "prompt_id", None) is not None)
    wait_for(lambda: len(comfy.prompts) == 1, timeout=30)  # the main thread applies nothing more: it was killed
    restart_queues_nothing_again(comfy, start_uploads, ledger)


def restart_queues_nothing_again(comfy: FakeComfyUI, start_uploads: Callable[..., Uploads], ledger: Ledger) -> None:
    """Upload "a", whose prompt ComfyUI holds already, is still pending: the next run settles it under that prompt
    and queues no second one."""
    pending = ledger.get_upload("a")
    assert pending is not None and pending.state == "pending"
    restarted = start_uploads()
    assert restarted.resume() == 1
    settle(restarted, ledger, ["a"])
    done = ledger.get_upload("a")
    assert done is not None and done.state == "done" and done.prompt_id == pending.prompt_id
    assert len(comfy.prompts) == 1, "the next run queued the workflow again"
