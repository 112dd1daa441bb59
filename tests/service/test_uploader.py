"""Uploads to a remote ComfyUI, in-process against the loopback fake, with a real Ledger and Publisher."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from PIL import Image

from service.comfyui import ComfyClient
from service.ledger import Ledger
from service.metrics import Metrics
from service.publish import Publisher
from service.upload_queue import Task
from service.upload_sender import Result
from service.uploader import Uploads
from service.workflow import load_workflow
from tests.conftest import PHOTO_NAMES, load_photo, wait_for
from tests.fake_comfyui import FakeComfyUI

if TYPE_CHECKING:
    from loguru import Record  # loguru's types live in its stubs only

TEMPLATES = Path(__file__).resolve().parents[2] / "deploy" / "comfyui"
SMOKE = TEMPLATES / "loadimage-save-api.json"
# A video node that carries the size each prompt was queued with (the fake only checks that it exists).
SIZED_WORKFLOW = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
    "2": {"class_type": "WanImageToVideo", "inputs": {"width": 832, "height": 480, "length": 81}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "v"}},
}
# SaveImage without its filename_prefix: ComfyUI answers 400 with node_errors for node 2.
BROKEN_WORKFLOW = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}},
}


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def png_of(photo: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(load_photo(photo)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def publish(publisher: Publisher, name: str, photo: str) -> bytes:
    """Publish a real photo as frame `name` with a sidecar like the runner's; returns the frame bytes."""
    frame = png_of(photo)
    sidecar = {
        "source": {"key": f"{name}.png", "metadata": {}},
        "output": {"frame": f"{name}.png", "frame_sha256": hashlib.sha256(frame).hexdigest()},
    }
    publisher.publish(name, frame=frame, heatmap=png_of("coffee"), sidecar=sidecar)
    return frame


def pixels(png: bytes) -> bytes:
    with Image.open(io.BytesIO(png)) as image:
        return image.convert("RGB").tobytes()


def stored(name: str, frame: bytes) -> str:
    """The name a frame goes under in ComfyUI with a workflow: one per version (see `Sender._upload_name`)."""
    return f"{name}-{hashlib.sha256(frame).hexdigest()[:8]}.png"


def settle(uploads: Uploads, ledger: Ledger, names: list[str]) -> None:
    """Pump until none of `names` is pending any more."""
    pump_until(uploads, lambda: all(getattr(ledger.get_upload(n), "state", None) in ("done", "failed") for n in names))


def pump_until(uploads: Uploads, condition: Callable[[], bool]) -> None:
    """Apply results as they come until `condition` holds."""

    def check() -> bool:
        uploads.pump()
        return condition()

    wait_for(check, timeout=30)


def sizes(comfy: FakeComfyUI) -> list[tuple[str, int, int]]:
    """(image, width, height) of every prompt ComfyUI accepted, in order."""
    return [(p["1"]["inputs"]["image"], p["2"]["inputs"]["width"], p["2"]["inputs"]["height"]) for p in comfy.prompts]


def uploads_sent(comfy: FakeComfyUI) -> int:
    return comfy.requests.count(("POST", "/upload/image"))


def value(metrics: Metrics, name: str, outcome: str) -> float:
    return metrics.registry.get_sample_value(name, {"outcome": outcome}) or 0.0


def sidecar(publisher: Publisher, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(publisher.sidecar_path(name).read_text(encoding="utf-8"))
    return data


def messages(logs: list[Record], level: str) -> list[str]:
    return [str(record["message"]) for record in logs if record["level"].name == level]


# -- the happy paths -----------------------------------------------------------


def test_every_frame_is_uploaded_and_its_workflow_queued_with_the_prompt_id_in_the_sidecar(
    comfy: FakeComfyUI, make_uploads: Callable[..., Uploads], ledger: Ledger, publisher: Publisher, metrics: Metrics
) -> None:
    uploads = make_uploads(comfy.url, workflow=load_workflow(SMOKE))
    frames = {name: publish(publisher, name, photo) for name, photo in [("a", "astronaut"), ("b", "chelsea")]}
    for name in frames:
        uploads.enqueue(name, f"{name}.png", 832, 480)
    settle(uploads, ledger, list(frames))

    client = ComfyClient(comfy.url)
    for name, data in frames.items():
        assert (comfy.input_dir / "sinkwatch" / stored(name, data)).read_bytes() == data
        upload = ledger.get_upload(name)
        assert upload is not None and upload.state == "done" and upload.reference == f"sinkwatch/{stored(name, data)}"
        assert upload.prompt_id
        note = sidecar(publisher, name)
        assert note["comfyui"] == {"upload": f"sinkwatch/{stored(name, data)}", "prompt_id": upload.prompt_id}
        assert note["output"]["frame_sha256"] == hashlib.sha256(data).hexdigest(), "the rest is kept"
        # The queued workflow really loads the uploaded frame, and it runs.
        assert client.wait(upload.prompt_id, timeout=10, poll=0.01) == "success"
        entry = client.history(upload.prompt_id)
        assert entry is not None and entry["prompt"][2]["1"]["inputs"]["image"] == f"sinkwatch/{stored(name, data)}"
    assert value(metrics, "sinkwatch_comfyui_uploads_total", "ok") == 2
    assert value(metrics, "sinkwatch_comfyui_prompts_total", "queued") == 2
    assert value(metrics, "sinkwatch_comfyui_uploads_total", "retried") == 0


def test_without_a_workflow_only_the_frame_is_uploaded(
    comfy: FakeComfyUI, make_uploads: Callable[..., Uploads], ledger: Ledger, publisher: Publisher, metrics: Metrics
) -> None:
    uploads = make_uploads(comfy.url)
    data = publish(publisher, "a", "rocket")
    uploads.enqueue("a", "a.png", 832, 480)
    settle(uploads, ledger, ["a"])

    assert (comfy.input_dir / "sinkwatch" / "a.png").read_bytes() == data
    assert [request for request in comfy.requests if request[1] == "/prompt"] == []
    assert sidecar(publisher, "a")["comfyui"] == {"upload": "sinkwatch/a.png", "prompt_id": None}
    assert value(metrics, "sinkwatch_comfyui_uploads_total", "ok") == 1
    for outcome in ("queued", "rejected", "failed"):
        assert value(metrics, "sinkwatch_comfyui_prompts_total", outcome) == 0


def test_a_reupload_of_a_republished_frame_overwrites_its_own_file(
    comfy: FakeComfyUI, make_uploads: Callable[..., Uploads], ledger: Ledger, publisher: Publisher
) -> None:
    uploads = make_uploads(comfy.url)
    publish(publisher, "a", "rocket")
    uploads.enqueue("a", "a.png", 832, 480)
    settle(uploads, ledger, ["a"])
    newer = publish(publisher, "a", "motorcycle_left")
    uploads.enqueue("a", "a.png", 832, 480)
    settle(uploads, ledger, ["a"])

    assert sorted(p.name for p in (comfy.input_dir / "sinkwatch").iterdir()) == ["a.png"], "no 'a (1).png'"
    assert (comfy.input_dir / "sinkwatch" / "a.png").read_bytes() == newer
    upload = ledger.get_upload("a")
    assert upload is not None and upload.generation == 2 and upload.state == "done"


# -- ComfyUI down ----------------------------------------------------------------


def test_comfyui_down_then_back_is_logged_once_each_and_retries_are_counted(
    comfy: FakeComfyUI,
    make_uploads: Callable[..., Uploads],
    ledger: Ledger,
    publisher: Publisher,
    metrics: Metrics,
    logs: list[Record],
) -> None:
    uploads = make_uploads(comfy.url)
    data = publish(publisher, "a", "astronaut")
    comfy.fail_next(503, count=3)
    uploads.enqueue("a", "a.png", 832, 480)
    settle(uploads, ledger, ["a"])

    assert (comfy.input_dir / "sinkwatch" / "a.png").read_bytes() == data
    assert value(metrics, "sinkwatch_comfyui_uploads_total", "retried") == 3
    assert value(metrics, "sinkwatch_comfyui_uploads_total", "ok") == 1
    down = [m for m in messages(logs, "WARNING") if "ComfyUI is down" in m]
    assert len(down) == 1 and "sending a" in down[0], "the line names the frame held up at the head of the line"
    assert len([m for m in messages(logs, "INFO") if "ComfyUI is back" in m]) == 1
    assert not uploads.down


def test_the_upload_is_pending_in_the_ledger_before_anything_is_sent(
    make_uploads: Callable[..., Uploads], ledger: Ledger, publisher: Publisher
) -> None:
    uploads = make_uploads(closed_port_url())
    publish(publisher, "a", "astronaut")
    uploads.enqueue("a", "a.png", 832, 480)
    upload = ledger.get_upload("a")
    assert upload is not None and upload.state == "pending" and (upload.width, upload.height) == (832, 480)
    assert upload.relpath == "a.png" and upload.generation == 1


def test_pending_uploads_survive_a_restart_while_comfyui_is_down(
    comfy: FakeComfyUI,
    make_uploads: Callable[..., Uploads],
    ledger: Ledger,
    publisher: Publisher,
    metrics: Metrics,
    tmp_path: Path,
) -> None:
    frames = {name: publish(publisher, name, photo) for name, photo in [("a", "astronaut"), ("b", "coffee")]}
    down = make_uploads(closed_port_url())
    for name in frames:
        down.enqueue(name, f"{name}.png", 832, 480)
    pump_until(down, lambda: value(metrics, "sinkwatch_comfyui_uploads_total", "retried") >= 2)
    assert down.down
    down.close()
    assert [u.name for u in ledger.uploads("pending")] == ["a", "b"]
    assert comfy.requests == []

    with Ledger(tmp_path / "state" / "ledger.sqlite3") as reopened:
        back = make_uploads(comfy.url, ledger=reopened)
        assert back.resume() == 2
        settle(back, reopened, list(frames))
        for name, data in frames.items():
            assert (comfy.input_dir / "sinkwatch" / f"{name}.png").read_bytes() == data
            assert getattr(reopened.get_upload(name), "state", None) == "done"
        back.close()


def assert_stopped_with_a_owed(ledger: Ledger) -> None:
    """The HTTP thread has ended, and frame "a" is still owed to ComfyUI (sent at the next start)."""
    assert not [thread.name for thread in threading.enumerate() if thread.name == "sinkwatch-comfyui"]
    assert getattr(ledger.get_upload("a"), "state", None) == "pending"


def test_close_cuts_a_long_backoff_short(
    make_uploads: Callable[..., Uploads], ledger: Ledger, publisher: Publisher, metrics: Metrics
) -> None:
    uploads = make_uploads(closed_port_url(), retry_base=3600.0, retry_cap=3600.0)
    publish(publisher, "a", "astronaut")
    uploads.enqueue("a", "a.png", 832, 480)
    pump_until(uploads, lambda: value(metrics, "sinkwatch_comfyui_uploads_total", "retried") == 1)
    uploads.close()
    assert_stopped_with_a_owed(ledger)


def test_close_cuts_a_request_comfyui_holds_short_and_leaves_its_upload_pending(
    comfy: FakeComfyUI, make_uploads: Callable[..., Uploads], ledger: Ledger, publisher: Publisher, logs: list[Record]
) -> None:
    """Waiting out the request's timeout bought nothing (the upload stays owed either way), and with a
    --comfyui-timeout over the systemd unit's TimeoutStopSec of 60 s the stop ended in a SIGKILL."""
    comfy.stall()
    uploads = make_uploads(comfy.url, timeout=120.0)
    publish(publisher, "a", "astronaut")
    uploads.enqueue("a", "a.png", 832, 480)
    wait_for(lambda: ("POST", "/upload/image") in comfy.requests, timeout=30)
    started = time.monotonic()
    uploads.close()
    assert time.monotonic() - started < 60, "the stop waited out the request's timeout"
    assert_stopped_with_a_owed(ledger)
    assert not messages(logs, "WARNING"), "a stop is no outage of ComfyUI (nor a retry to count)"


def test_a_hung_comfyui_times_out_and_is_retried(
    comfy: FakeComfyUI, make_uploads: Callable[..., Uploads], publisher: Publisher, metrics: Metrics
) -> None:
    comfy.stall()
    uploads = make_uploads(comfy.url, timeout=0.2)
    publish(publisher, "a", "astronaut")
    uploads.enqueue("a", "a.png", 832, 480)
    pump_until(uploads, lambda: value(metrics, "sinkwatch_comfyui_uploads_total", "retried") >= 1)
    assert uploads.down
    uploads.close()


# -- failures that are not retried -------------------------------------------------


def test_a_rejected_prompt_is_logged_with_node_errors_counted_and_not_retried(
    comfy: FakeComfyUI,
    make_uploads: Callable[..., Uploads],
    ledger: Ledger,
    publisher: Publisher,
    metrics: Metrics,
    logs: list[Record],
) -> None:
    uploads = make_uploads(comfy.url, workflow=BROKEN_WORKFLOW)
    frame = publish(publisher, "a", "chelsea")
    uploads.enqueue("a", "a.png", 832, 480)
    settle(uploads, ledger, ["a"])

    assert comfy.requests.count(("POST", "/prompt")) == 1
    assert value(metrics, "sinkwatch_comfyui_prompts_total", "rejected") == 1
    assert value(metrics, "sinkwatch_comfyui_uploads_total", "ok") == 1
    errors = [record for record in logs if record["level"].name == "ERROR"]
    assert len(errors) == 1
    assert "node 2 (SaveImage): filename_prefix" in errors[0]["message"]
    assert errors[0]["extra"]["node_errors"] == ["node 2 (SaveImage): filename_prefix"]
    upload = ledger.get_upload("a")
    assert upload is not None and upload.state == "failed" and upload.reason == "comfyui_rejected"
    assert upload.reference == f"sinkwatch/{stored('a', frame)}"
    note = sidecar(publisher, "a")["comfyui"]
    assert note["prompt_id"] is None and "node 2 (SaveImage): filename_prefix" in note["prompt_error"]


def test_a_size_the_video_node_cannot_take_fails_the_prompt_without_sending_it(
    comfy: FakeComfyUI, make_uploads: Callable[..., Uploads], ledger: Ledger, publisher: Publisher, metrics: Metrics
) -> None:
    uploads = make_uploads(comfy.url, workflow=load_workflow(TEMPLATES / "wan22-i2v-api.json"))
    publish(publisher, "a", "chelsea")
    uploads.enqueue("a", "a.png", 830, 480)
    settle(uploads, ledger, ["a"])

    assert ("POST", "/prompt") not in comfy.requests
    assert value(metrics, "sinkwatch_comfyui_prompts_total", "failed") == 1
    upload = ledger.get_upload("a")
    assert upload is not None and upload.state == "failed" and upload.reason == "workflow"
    assert "steps of 16" in str(upload.message)


def test_a_frame_that_is_gone_fails_without_a_request(
    comfy: FakeComfyUI, make_uploads: Callable[..., Uploads], ledger: Ledger, metrics: Metrics, logs: list[Record]
) -> None:
    uploads = make_uploads(comfy.url)
    uploads.enqueue("never-published", "x.png", 832, 480)
    settle(uploads, ledger, ["never-published"])

    assert comfy.requests == []
    assert messages(logs, "WARNING") == ["never-published left the queue before it was sent to ComfyUI"]
    assert not messages(logs, "ERROR")
    # Not ComfyUI's doing, and nothing to page about (SinkwatchComfyUIFailed counts "failed" only).
    assert value(metrics, "sinkwatch_comfyui_uploads_total", "gone") == 1
    assert value(metrics, "sinkwatch_comfyui_uploads_total", "failed") == 0
    upload = ledger.get_upload("never-published")
    assert upload is not None and upload.state == "failed" and upload.reason == "comfyui_upload"


# -- a frame republished while its upload is under way ------------------------------


def test_an_answer_for_an_older_frame_does_not_settle_the_newer_one(
    comfy: FakeComfyUI, make_uploads: Callable[..., Uploads], ledger: Ledger, publisher: Publisher, metrics: Metrics
) -> None:
    uploads = make_uploads(comfy.url, retry_base=3600.0, retry_cap=3600.0)
    first = publish(publisher, "a", "rocket")
    uploads.enqueue("a", "a.png", 832, 480)
    stored = comfy.input_dir / "sinkwatch" / "a.png"
    wait_for(lambda: stored.exists() and stored.read_bytes() == first)
    comfy.fail_next(503)  # the second upload now waits an hour in its backoff
    publish(publisher, "a", "motorcycle_left")
    uploads.enqueue("a", "a.png", 832, 480)
    pump_until(uploads, lambda: value(metrics, "sinkwatch_comfyui_uploads_total", "retried") == 1)

    upload = ledger.get_upload("a")
    assert upload is not None and upload.generation == 2 and upload.state == "pending"
    assert "comfyui" not in sidecar(publisher, "a"), "the old upload is not noted in the new frame's sidecar"


def test_the_sidecar_is_noted_only_while_it_describes_the_frame_that_was_sent(
    comfy: FakeComfyUI, make_uploads: Callable[..., Uploads], ledger: Ledger, publisher: Publisher
) -> None:
    uploads = make_uploads(comfy.url)
    first = publish(publisher, "a", "rocket")
    uploads.enqueue("a", "a.png", 832, 480)
    stored = comfy.input_dir / "sinkwatch" / "a.png"
    wait_for(lambda: stored.exists() and stored.read_bytes() == first)
    publish(publisher, "a", "motorcycle_left")  # republished; the engine has not reported it yet
    settle(uploads, ledger, ["a"])

    assert "comfyui" not in sidecar(publisher, "a")


# -- answers that are not ComfyUI's: retried, never dropped ---------------------------------


@pytest.mark.parametrize(
    ("status", "headers"), [(404, {}), (401, {}), (403, {}), (308, {"Location": "https://comfy.example/upload/image"})]
)
def test_a_wrong_url_or_a_proxy_keeps_the_upload_pending_until_comfyui_answers(
    comfy: FakeComfyUI,
    make_uploads: Callable[..., Uploads],
    ledger: Ledger,
    publisher: Publisher,
    metrics: Metrics,
    logs: list[Record],
    status: int,
    headers: dict[str, str],
) -> None:
    uploads = make_uploads(comfy.url)
    data = publish(publisher, "a", "astronaut")
    for _ in range(3):  # until the operator fixes the URL (or the proxy)
        comfy.answer_next(status, headers={"Content-Type": "text/html", **headers}, body=b"<html>no</html>")
    uploads.enqueue("a", "a.png", 832, 480)
    settle(uploads, ledger, ["a"])

    assert getattr(ledger.get_upload("a"), "state", None) == "done"
    assert (comfy.input_dir / "sinkwatch" / "a.png").read_bytes() == data
    assert value(metrics, "sinkwatch_comfyui_uploads_total", "retried") == 3
    assert value(metrics, "sinkwatch_comfyui_uploads_total", "failed") == 0
    down = [m for m in messages(logs, "WARNING") if "ComfyUI is down" in m]
    assert len(down) == 1 and f" {status} " in down[0] and "check --comfyui-url" in down[0]


# -- one task per name: a republished frame is sent once, as it is now ---------------------


def test_a_frame_republished_while_its_upload_waits_is_sent_once_with_its_newest_size(
    comfy: FakeComfyUI, make_uploads: Callable[..., Uploads], ledger: Ledger, publisher: Publisher
) -> None:
    uploads = make_uploads(comfy.url, workflow=SIZED_WORKFLOW)
    first = publish(publisher, "x", "chelsea")
    publish(publisher, "a", "rocket")
    comfy.stall()
    uploads.enqueue("x", "x.png", 832, 480)
    wait_for(lambda: uploads_sent(comfy) == 1)  # the HTTP thread is held up with x
    uploads.enqueue("a", "a.png", 832, 480)
    newest = publish(publisher, "a", "motorcycle_left")  # the rule now says portrait
    uploads.enqueue("a", "a.png", 480, 832)
    comfy.release()
    settle(uploads, ledger, ["x", "a"])

    assert uploads_sent(comfy) == 2
    assert sizes(comfy) == [
        (f"sinkwatch/{stored('x', first)}", 832, 480),
        (f"sinkwatch/{stored('a', newest)}", 480, 832),
    ]
    assert (comfy.input_dir / "sinkwatch" / stored("a", newest)).read_bytes() == newest
    upload = ledger.get_upload("a")
    assert upload is not None and (upload.state, upload.generation) == ("done", 2)


def test_a_prompt_still_in_comfyuis_queue_loads_the_frame_it_was_queued_for_though_the_frame_was_republished(
    comfy: FakeComfyUI, make_uploads: Callable[..., Uploads], ledger: Ledger, publisher: Publisher
) -> None:
    """ComfyUI's Load Image reads its file when the prompt runs, minutes after it was queued behind other videos.
    An upload over the same name gave the waiting prompt the newer frame (and the first video never came)."""
    uploads = make_uploads(comfy.url, workflow=load_workflow(SMOKE))
    queued: list[tuple[str, bytes]] = []
    for photo in ("chelsea", "coffee"):  # a generator writing latest.png again and again
        frame = publish(publisher, "latest", photo)
        uploads.enqueue("latest", "latest.png", 832, 480)
        settle(uploads, ledger, ["latest"])
        prompt_id = ledger.get_upload("latest").prompt_id  # type: ignore[union-attr]
        assert prompt_id is not None and prompt_id not in [p for p, _frame in queued]
        queued.append((prompt_id, frame))

    client = ComfyClient(comfy.url)
    for prompt_id, frame in queued:  # ComfyUI runs them now, in order
        assert client.wait(prompt_id, timeout=10, poll=0.01) == "success"
        output = client.history(prompt_id)["outputs"]["2"]["images"][0]  # type: ignore[index]
        rendered = comfy.output_dir / output["subfolder"] / output["filename"]
        assert pixels(rendered.read_bytes()) == pixels(frame), "it rendered another frame"


def test_a_frame_republished_between_two_attempts_drops_the_older_task(
    comfy: FakeComfyUI, make_uploads: Callable[..., Uploads], ledger: Ledger, publisher: Publisher, metrics: Metrics
) -> None:
    uploads = make_uploads(comfy.url, workflow=SIZED_WORKFLOW)
    publish(publisher, "a", "rocket")
    comfy.stall()
    uploads.enqueue("a", "a.png", 832, 480)
    wait_for(lambda: uploads_sent(comfy) == 1)  # generation 1's first attempt is in ComfyUI's hands...
    newest = publish(publisher, "a", "motorcycle_left")
    uploads.enqueue("a", "a.png", 480, 832)
    comfy.fail_next(503)  # ...and fails, so it would be tried again
    comfy.release()
    settle(uploads, ledger, ["a"])

    assert uploads_sent(comfy) == 2, "the failed attempt and generation 2's"
    assert sizes(comfy) == [(f"sinkwatch/{stored('a', newest)}", 480, 832)]
    assert (comfy.input_dir / "sinkwatch" / stored("a", newest)).read_bytes() == newest
    assert value(metrics, "sinkwatch_comfyui_uploads_total", "ok") == 1
    assert value(metrics, "sinkwatch_comfyui_prompts_total", "queued") == 1


def test_only_max_tasks_wait_in_memory_and_the_ledger_holds_the_rest_until_comfyui_takes_them(
    comfy: FakeComfyUI, make_uploads: Callable[..., Uploads], ledger: Ledger, publisher: Publisher
) -> None:
    uploads = make_uploads(comfy.url, max_tasks=3)
    names = [f"f{index}" for index in range(9)]
    for index, name in enumerate(names):
        publish(publisher, name, PHOTO_NAMES[index % len(PHOTO_NAMES)])
    comfy.stall()
    for name in names:
        uploads.enqueue(name, f"{name}.png", 832, 480)
        uploads.enqueue("f0", "f0.png", 832, 480)  # a name republished again and again takes one place
    wait_for(lambda: uploads_sent(comfy) == 1)
    uploads.pump()
    assert uploads._tasks.qsize() <= 3  # what waits in memory; the ledger has all of them
    assert ledger.pending_upload_count() == 9
    comfy.release()
    settle(uploads, ledger, names)

    assert uploads_sent(comfy) == 9 + 1, "each once, f0 once more: republished while it was being sent"
    assert sorted(p.stem for p in (comfy.input_dir / "sinkwatch").iterdir()) == names
    assert {u.state for u in ledger.uploads()} == {"done"}


def test_resume_lines_up_a_page_and_sends_every_pending_upload_once(
    comfy: FakeComfyUI, make_uploads: Callable[..., Uploads], ledger: Ledger, publisher: Publisher
) -> None:
    names = [f"f{index}" for index in range(7)]
    for index, name in enumerate(names):
        publish(publisher, name, PHOTO_NAMES[index])
        ledger.upload_pending(name, relpath=f"{name}.png", width=832, height=480)  # left by an earlier run
    uploads = make_uploads(comfy.url, max_tasks=2)
    assert not uploads.idle()
    assert uploads.resume() == 7
    settle(uploads, ledger, names)

    assert uploads_sent(comfy) == 7
    assert {u.state for u in ledger.uploads()} == {"done"}
    assert uploads.idle()


# -- the top level of input/ is the user's too ----------------------------------------------


def test_at_the_top_level_a_users_file_is_kept_and_the_name_comfyui_gave_is_used(
    comfy: FakeComfyUI, make_uploads: Callable[..., Uploads], ledger: Ledger, publisher: Publisher
) -> None:
    name = stored("a", png_of("rocket"))
    users = comfy.input_dir / name
    users.write_bytes(png_of("coffee"))  # uploaded by hand through Load Image, long ago
    uploads = make_uploads(comfy.url, workflow=SIZED_WORKFLOW, subfolder="")
    frame = publish(publisher, "a", "rocket")
    uploads.enqueue("a", "a.png", 832, 480)
    settle(uploads, ledger, ["a"])

    given = name.replace(".png", " (1).png")
    assert users.read_bytes() == png_of("coffee")
    assert (comfy.input_dir / given).read_bytes() == frame
    upload = ledger.get_upload("a")
    assert upload is not None and (upload.state, upload.reference) == ("done", given)
    assert sidecar(publisher, "a")["comfyui"]["upload"] == given
    assert sizes(comfy) == [(given, 832, 480)]


# -- metrics ------------------------------------------------------------------------------------


def test_prompt_retries_are_counted(
    comfy: FakeComfyUI, make_uploads: Callable[..., Uploads], ledger: Ledger, publisher: Publisher, metrics: Metrics
) -> None:
    uploads = make_uploads(comfy.url, workflow=load_workflow(SMOKE))
    publish(publisher, "a", "astronaut")
    comfy.fail_next(503, count=2, path="/prompt")
    uploads.enqueue("a", "a.png", 832, 480)
    settle(uploads, ledger, ["a"])

    assert value(metrics, "sinkwatch_comfyui_prompts_total", "retried") == 2
    assert value(metrics, "sinkwatch_comfyui_prompts_total", "queued") == 1
    assert value(metrics, "sinkwatch_comfyui_uploads_total", "retried") == 0


def test_the_pending_gauge_follows_the_ledger_and_up_tells_whether_comfyui_answers(
    comfy: FakeComfyUI, make_uploads: Callable[..., Uploads], ledger: Ledger, publisher: Publisher, metrics: Metrics
) -> None:
    def gauge(name: str) -> float | None:
        return metrics.registry.get_sample_value(name)

    down = make_uploads(closed_port_url(), retry_base=3600.0, retry_cap=3600.0)
    down.pump()
    assert gauge("sinkwatch_comfyui_up") is None, "nothing is known before the first request"
    assert gauge("sinkwatch_comfyui_pending_uploads") == 0
    for name, photo in [("a", "astronaut"), ("b", "coffee")]:
        publish(publisher, name, photo)
        down.enqueue(name, f"{name}.png", 832, 480)
    pump_until(down, lambda: gauge("sinkwatch_comfyui_up") == 0 and gauge("sinkwatch_comfyui_pending_uploads") == 2)
    down.close()

    back = make_uploads(comfy.url)
    back.resume()
    settle(back, ledger, ["a", "b"])
    assert gauge("sinkwatch_comfyui_up") == 1
    assert gauge("sinkwatch_comfyui_pending_uploads") == 0


# -- idle, and the sidecar of a frame a worker is publishing ---------------------------------


def test_idle_only_with_nothing_lined_up_in_flight_unapplied_or_pending(
    comfy: FakeComfyUI, make_uploads: Callable[..., Uploads], ledger: Ledger, publisher: Publisher
) -> None:
    uploads = make_uploads(comfy.url)
    assert uploads.idle()
    publish(publisher, "a", "astronaut")
    comfy.stall()
    uploads.enqueue("a", "a.png", 832, 480)
    assert not uploads.idle(), "lined up"
    wait_for(lambda: uploads_sent(comfy) == 1)
    assert not uploads.idle(), "in flight"
    comfy.release()
    wait_for(lambda: (comfy.input_dir / "sinkwatch" / "a.png").is_file())
    assert not uploads.idle(), "sent, its result not applied yet"
    pump_until(uploads, uploads.idle)
    assert getattr(ledger.get_upload("a"), "state", None) == "done"

    publish(publisher, "b", "coffee")
    ledger.upload_pending("b", relpath="b.png", width=832, height=480)  # pending in the ledger only
    assert not uploads.idle()
    uploads.resume()
    pump_until(uploads, uploads.idle)
    assert getattr(ledger.get_upload("b"), "state", None) == "done"


def test_a_result_for_a_frame_a_worker_is_publishing_waits_and_the_others_do_not(
    make_uploads: Callable[..., Uploads], ledger: Ledger, publisher: Publisher
) -> None:
    publishing = {"a", "c"}
    uploads = make_uploads(closed_port_url(), busy=publishing.__contains__)
    for name, photo in [("a", "rocket"), ("b", "chelsea"), ("c", "coffee")]:
        data = publish(publisher, name, photo)
        generation = ledger.upload_pending(name, relpath=f"{name}.png", width=832, height=480)
        sent = Task(name, f"{name}.png", 832, 480, generation)
        digest = hashlib.sha256(data).hexdigest()
        uploads._results.put(Result(sent, "uploaded", reference=f"sinkwatch/{name}.png", frame_sha256=digest))
    uploads.pump()
    assert sidecar(publisher, "b")["comfyui"] == {"upload": "sinkwatch/b.png", "prompt_id": None}
    for name in ("a", "c"):
        assert "comfyui" not in sidecar(publisher, name), "not read, not written while a worker writes it"
        assert getattr(ledger.get_upload(name), "state", None) == "pending"

    newer = publish(publisher, "a", "motorcycle_left")  # the worker's frame and sidecar of a land
    publishing.discard("a")
    uploads.pump()
    assert "comfyui" not in sidecar(publisher, "a"), "the newer frame's own upload will note it"
    assert sidecar(publisher, "a")["output"]["frame_sha256"] == hashlib.sha256(newer).hexdigest()
    assert getattr(ledger.get_upload("c"), "state", None) == "pending"

    uploads.close()  # stopping while c's worker still publishes: c stays owed, for the next start
    assert "comfyui" not in sidecar(publisher, "c")
    assert getattr(ledger.get_upload("c"), "state", None) == "pending"
    publishing.clear()  # c's worker failed: nothing newer came; the held note is written after all
    uploads.pump()
    assert sidecar(publisher, "c")["comfyui"] == {"upload": "sinkwatch/c.png", "prompt_id": None}
    assert getattr(ledger.get_upload("c"), "state", None) == "done"


def test_a_frame_republished_while_its_prompt_waits_for_a_retry_drops_the_older_prompt(
    comfy: FakeComfyUI, make_uploads: Callable[..., Uploads], ledger: Ledger, publisher: Publisher, metrics: Metrics
) -> None:
    uploads = make_uploads(comfy.url, workflow=SIZED_WORKFLOW, retry_base=2.0, retry_cap=2.0)
    publish(publisher, "a", "rocket")
    comfy.fail_next(503, path="/prompt")  # generation 1 is uploaded, its prompt waits 2 s for a retry...
    uploads.enqueue("a", "a.png", 832, 480)
    pump_until(uploads, lambda: value(metrics, "sinkwatch_comfyui_prompts_total", "retried") == 1)
    newest = publish(publisher, "a", "motorcycle_left")  # ...while the frame is republished, portrait now
    uploads.enqueue("a", "a.png", 480, 832)
    settle(uploads, ledger, ["a"])

    assert sizes(comfy) == [(f"sinkwatch/{stored('a', newest)}", 480, 832)], (
        "generation 1's stale prompt was queued too"
    )
    assert (comfy.input_dir / "sinkwatch" / stored("a", newest)).read_bytes() == newest
    assert value(metrics, "sinkwatch_comfyui_prompts_total", "queued") == 1
