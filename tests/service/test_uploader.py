"""Uploads to a remote ComfyUI, in-process against the loopback fake, with a real Ledger and Publisher."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from loguru import logger
from PIL import Image
from prometheus_client import CollectorRegistry

from service.comfyui import ComfyClient
from service.ledger import MIGRATIONS, SCHEMA_VERSION, Ledger
from service.metrics import Metrics
from service.publish import Publisher
from service.uploader import Uploads
from service.workflow import load_workflow
from tests.conftest import load_photo, wait_for
from tests.fake_comfyui import FakeComfyUI

TEMPLATES = Path(__file__).resolve().parents[2] / "deploy" / "comfyui"
SMOKE = TEMPLATES / "loadimage-save-api.json"
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


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    (tmp_path / "state").mkdir()
    with Ledger(tmp_path / "state" / "ledger.sqlite3") as opened:
        yield opened


@pytest.fixture
def publisher(tmp_path: Path) -> Publisher:
    return Publisher(tmp_path / "queue")


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    records: list[dict[str, Any]] = []
    sink = logger.add(lambda message: records.append(message.record), level="DEBUG")
    yield records
    logger.remove(sink)


@pytest.fixture
def make_uploads(ledger: Ledger, publisher: Publisher, metrics: Metrics) -> Iterator[Callable[..., Uploads]]:
    """Build Uploads against `url`; every one built is closed after the test."""
    made: list[Uploads] = []

    def make(url: str, *, workflow: dict[str, Any] | None = None, **kwargs: Any) -> Uploads:
        kwargs.setdefault("retry_base", 0.001)
        kwargs.setdefault("retry_cap", 0.01)
        timeout = kwargs.pop("timeout", 5.0)
        uploads = Uploads(
            client=ComfyClient(url, timeout=timeout),
            ledger=kwargs.pop("ledger", ledger),
            publisher=publisher,
            metrics=metrics,
            workflow=workflow,
            **kwargs,
        )
        made.append(uploads)
        return uploads

    yield make
    for uploads in made:
        uploads.close()


def publish(publisher: Publisher, name: str, photo: str) -> bytes:
    """Publish a real photo as frame `name` with a sidecar like the runner's; returns the frame bytes."""
    frame = png_of(photo)
    sidecar = {
        "source": {"key": f"{name}.png", "metadata": {}},
        "output": {"frame": f"{name}.png", "frame_sha256": hashlib.sha256(frame).hexdigest()},
    }
    publisher.publish(name, frame=frame, heatmap=png_of("coffee"), sidecar=sidecar)
    return frame


def settle(uploads: Uploads, ledger: Ledger, names: list[str]) -> None:
    """Pump until none of `names` is pending any more."""
    pump_until(uploads, lambda: all(getattr(ledger.get_upload(n), "state", None) in ("done", "failed") for n in names))


def pump_until(uploads: Uploads, condition: Callable[[], bool]) -> None:
    """Apply results as they come until `condition` holds."""

    def check() -> bool:
        uploads.pump()
        return condition()

    wait_for(check, timeout=30)


def value(metrics: Metrics, name: str, outcome: str) -> float:
    return metrics.registry.get_sample_value(name, {"outcome": outcome}) or 0.0


def sidecar(publisher: Publisher, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(publisher.sidecar_path(name).read_text(encoding="utf-8"))
    return data


def messages(logs: list[dict[str, Any]], level: str) -> list[str]:
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
        assert (comfy.input_dir / "sinkwatch" / f"{name}.png").read_bytes() == data
        upload = ledger.get_upload(name)
        assert upload is not None and upload.state == "done" and upload.reference == f"sinkwatch/{name}.png"
        assert upload.prompt_id
        note = sidecar(publisher, name)
        assert note["comfyui"] == {"upload": f"sinkwatch/{name}.png", "prompt_id": upload.prompt_id}
        assert note["output"]["frame_sha256"] == hashlib.sha256(data).hexdigest(), "the rest is kept"
        # The queued workflow really loads the uploaded frame, and it runs.
        assert client.wait(upload.prompt_id, timeout=10, poll=0.01) == "success"
        entry = client.history(upload.prompt_id)
        assert entry is not None and entry["prompt"][2]["1"]["inputs"]["image"] == f"sinkwatch/{name}.png"
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
    logs: list[dict[str, Any]],
) -> None:
    uploads = make_uploads(comfy.url)
    data = publish(publisher, "a", "astronaut")
    comfy.fail_next(503, count=3)
    uploads.enqueue("a", "a.png", 832, 480)
    settle(uploads, ledger, ["a"])

    assert (comfy.input_dir / "sinkwatch" / "a.png").read_bytes() == data
    assert value(metrics, "sinkwatch_comfyui_uploads_total", "retried") == 3
    assert value(metrics, "sinkwatch_comfyui_uploads_total", "ok") == 1
    assert [m for m in messages(logs, "WARNING") if "ComfyUI is down" in m] != []
    assert len([m for m in messages(logs, "WARNING") if "ComfyUI is down" in m]) == 1
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


def test_close_cuts_a_long_backoff_short(
    make_uploads: Callable[..., Uploads], ledger: Ledger, publisher: Publisher, metrics: Metrics
) -> None:
    uploads = make_uploads(closed_port_url(), retry_base=3600.0, retry_cap=3600.0)
    publish(publisher, "a", "astronaut")
    uploads.enqueue("a", "a.png", 832, 480)
    pump_until(uploads, lambda: value(metrics, "sinkwatch_comfyui_uploads_total", "retried") == 1)
    uploads.close()
    assert not [thread.name for thread in threading.enumerate() if thread.name == "sinkwatch-comfyui"]
    assert getattr(ledger.get_upload("a"), "state", None) == "pending"


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
    logs: list[dict[str, Any]],
) -> None:
    uploads = make_uploads(comfy.url, workflow=BROKEN_WORKFLOW)
    publish(publisher, "a", "chelsea")
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
    assert upload.reference == "sinkwatch/a.png"
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
    comfy: FakeComfyUI, make_uploads: Callable[..., Uploads], ledger: Ledger, metrics: Metrics
) -> None:
    uploads = make_uploads(comfy.url)
    uploads.enqueue("never-published", "x.png", 832, 480)
    settle(uploads, ledger, ["never-published"])

    assert comfy.requests == []
    assert value(metrics, "sinkwatch_comfyui_uploads_total", "failed") == 1
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


# -- the ledger's uploads table --------------------------------------------------------


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
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2


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
