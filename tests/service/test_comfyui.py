"""ComfyClient against a loopback fake that behaves like ComfyUI's server (tests/fake_comfyui.py)."""

from __future__ import annotations

import base64
import json
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from service.comfyui import ComfyClient, UploadResult, failure_of
from service.comfyui_transport import exchange
from service.errors import ComfyPending, ComfyRejected, ComfyUnavailable, ConfigError
from service.workflow import load_workflow, prepare
from tests.conftest import photo_file
from tests.fake_comfyui import FakeComfyUI

TEMPLATES = Path(__file__).resolve().parents[2] / "deploy" / "comfyui"


class FakeClock:
    """Time that moves only when someone sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def client(comfy: FakeComfyUI) -> ComfyClient:
    return ComfyClient(comfy.url, timeout=5.0)


@pytest.fixture(scope="module")
def photo_png() -> bytes:
    return photo_file("astronaut").read_bytes()


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def smoke_prompt(image: str) -> dict[str, object]:
    return prepare(load_workflow(TEMPLATES / "loadimage-save-api.json"), image=image, width=832, height=480)


# --- upload -------------------------------------------------------------------------------------


def test_upload_stores_the_frame_in_the_sinkwatch_subfolder(
    comfy: FakeComfyUI, client: ComfyClient, photo_png: bytes
) -> None:
    result = client.upload_image(photo_png, name="astronaut_0001.png")
    assert result == UploadResult(name="astronaut_0001.png", subfolder="sinkwatch", type="input")
    assert result.reference == "sinkwatch/astronaut_0001.png"
    assert (comfy.input_dir / "sinkwatch" / "astronaut_0001.png").read_bytes() == photo_png
    assert comfy.requests == [("POST", "/upload/image")]


def test_upload_to_the_top_level_when_asked(comfy: FakeComfyUI, client: ComfyClient, photo_png: bytes) -> None:
    result = client.upload_image(photo_png, name="frame.png", subfolder="")
    assert (result.name, result.subfolder, result.reference) == ("frame.png", "", "frame.png")
    assert (comfy.input_dir / "frame.png").read_bytes() == photo_png


def test_reupload_with_overwrite_replaces_the_sources_own_file(
    comfy: FakeComfyUI, client: ComfyClient, photo_png: bytes
) -> None:
    client.upload_image(b"first version", name="frame.png")
    result = client.upload_image(photo_png, name="frame.png")
    assert result.name == "frame.png"
    assert sorted(p.name for p in (comfy.input_dir / "sinkwatch").iterdir()) == ["frame.png"]
    assert (comfy.input_dir / "sinkwatch" / "frame.png").read_bytes() == photo_png


def test_without_overwrite_comfyui_renames_different_content_and_dedups_same(
    comfy: FakeComfyUI, client: ComfyClient, photo_png: bytes
) -> None:
    first = client.upload_image(photo_png, name="frame.png", overwrite=False)
    second = client.upload_image(b"other content", name="frame.png", overwrite=False)
    third = client.upload_image(b"yet another", name="frame.png", overwrite=False)
    again = client.upload_image(photo_png, name="frame.png", overwrite=False)
    assert [r.name for r in (first, second, third, again)] == [
        "frame.png",
        "frame (1).png",
        "frame (2).png",
        "frame.png",
    ]
    folder = comfy.input_dir / "sinkwatch"
    assert sorted(p.name for p in folder.iterdir()) == ["frame (1).png", "frame (2).png", "frame.png"]
    assert (folder / "frame (1).png").read_bytes() == b"other content"


def test_at_the_top_level_an_upload_never_replaces_a_users_file(comfy: FakeComfyUI, photo_png: bytes) -> None:
    users = comfy.input_dir / "frame.png"
    users.write_bytes(b"the user's own picture")
    client = ComfyClient(comfy.url, subfolder="")
    stored = client.upload_image(photo_png, name="frame.png")
    assert (stored.name, stored.reference) == ("frame (1).png", "frame (1).png")
    assert users.read_bytes() == b"the user's own picture"
    assert (comfy.input_dir / "frame (1).png").read_bytes() == photo_png
    assert client.upload_image(photo_png, name="frame.png").name == "frame (1).png", "the same content is found again"


def test_a_subfolder_leaving_input_is_refused_with_400(comfy: FakeComfyUI, client: ComfyClient) -> None:
    with pytest.raises(ComfyRejected) as caught:
        client.upload_image(b"data", name="frame.png", subfolder="../x")
    error = caught.value
    assert error.status == 400
    assert (error.reason, error.transient) == ("comfyui_rejected", False)
    assert not (comfy.root / "x").exists()


@pytest.mark.parametrize("subfolder", ["../x", "/abs", "a/../../b"])
def test_a_configured_subfolder_outside_input_is_a_config_error(subfolder: str) -> None:
    with pytest.raises(ConfigError):
        ComfyClient("http://127.0.0.1:8188", subfolder=subfolder)


@pytest.mark.parametrize("url", ["127.0.0.1:8188", "ftp://host", "http://"])
def test_a_malformed_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError):
        ComfyClient(url)


@pytest.mark.parametrize("name", ["", "..", "a/b.png", "a\\b.png"])
def test_upload_refuses_names_that_are_not_plain_file_names(comfy: FakeComfyUI, client: ComfyClient, name: str) -> None:
    with pytest.raises(ValueError, match="plain file name"):
        client.upload_image(b"x", name=name)
    assert comfy.requests == []


def test_non_ascii_names_arrive_intact(comfy: FakeComfyUI, client: ComfyClient) -> None:
    result = client.upload_image(b"pixels", name="café_0001.png")
    assert result.name == "café_0001.png"
    assert (comfy.input_dir / "sinkwatch" / "café_0001.png").read_bytes() == b"pixels"


# Names ComfyUI's multipart parser (aiohttp) is touchy about: it splits Content-Disposition on every ';'.
AWKWARD_NAMES = [
    "a;b;c.png",
    'a"b;c; d=e.png',
    "a;b.png",
    "it's 50%20 #1.png",
    "tab\there.png",
    "ü ñ 日本.png",
    "e\u0301.png",
    "x\u00a0y.png",
]


@pytest.mark.parametrize("name", AWKWARD_NAMES)
def test_awkward_names_arrive_intact_at_the_reference_comfyui_answers(
    comfy: FakeComfyUI, client: ComfyClient, name: str
) -> None:
    result = client.upload_image(b"pixels of " + name.encode(), name=name)
    assert result.reference == f"sinkwatch/{name}"
    assert (comfy.input_dir / result.reference).read_bytes() == b"pixels of " + name.encode()


def test_a_part_whose_header_aiohttp_cannot_parse_is_a_500_as_in_comfyui(comfy: FakeComfyUI) -> None:
    # What sinkwatch used to send for "a;b;c.png": aiohttp finds no field name in it and ComfyUI answers 500.
    body = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a;b;c.png"\r\n\r\npixels\r\n--b--\r\n'
    reply = exchange(
        "POST",
        comfy.url + "/upload/image",
        body=body,
        headers={"Content-Type": "multipart/form-data; boundary=b"},
        timeout=5,
    )
    assert reply.status == 500
    assert not (comfy.input_dir / "a;b;c.png").exists()


# --- prompt and history -------------------------------------------------------------------------


def test_a_prompt_naming_a_missing_image_is_rejected_with_node_errors(comfy: FakeComfyUI, client: ComfyClient) -> None:
    with pytest.raises(ComfyRejected) as caught:
        client.queue_prompt(smoke_prompt("sinkwatch/missing.png"))
    error = caught.value
    assert error.status == 400
    assert error.error_type == "prompt_outputs_failed_validation"
    assert set(error.node_errors) == {"1"}
    assert error.node_errors["1"]["class_type"] == "LoadImage"
    assert error.node_errors["1"]["dependent_outputs"] == ["2"]
    assert error.node_messages() == ["node 1 (LoadImage): image - Invalid image file: sinkwatch/missing.png"]
    record = error.as_record()
    assert record["reason"] == "comfyui_rejected"
    assert record["node_errors"] == error.node_messages()
    assert "Prompt outputs failed validation" in str(error)


def test_an_unknown_node_class_is_rejected(client: ComfyClient) -> None:
    workflow = load_workflow(TEMPLATES / "wan22-i2v-api.json")
    with pytest.raises(ComfyRejected) as caught:
        client.queue_prompt(workflow)
    assert caught.value.error_type == "missing_node_type"
    assert caught.value.node_errors == {}


def test_history_is_empty_until_done_then_success(comfy: FakeComfyUI, client: ComfyClient, photo_png: bytes) -> None:
    uploaded = client.upload_image(photo_png, name="astronaut_0001.png")
    prompt_id = client.queue_prompt(smoke_prompt(uploaded.reference))
    assert client.history(prompt_id) is None
    entry = client.history(prompt_id)
    assert entry is not None
    assert entry["status"]["status_str"] == "success"
    assert entry["outputs"]["2"]["images"][0]["subfolder"] == "sinkwatch"


def test_wait_polls_until_success(comfy: FakeComfyUI, photo_png: bytes) -> None:
    comfy.pending_polls = 3
    client = ComfyClient(comfy.url)
    clock = FakeClock()
    uploaded = client.upload_image(photo_png, name="astronaut_0001.png")
    prompt_id = client.queue_prompt(smoke_prompt(uploaded.reference))
    assert client.wait(prompt_id, timeout=60, poll=0.5, sleep=clock.sleep, clock=clock) == "success"
    assert clock.sleeps == [0.5, 0.5, 0.5]
    assert comfy.requests.count(("GET", f"/history/{prompt_id}")) == 4


def test_wait_reports_an_execution_error(comfy: FakeComfyUI, client: ComfyClient) -> None:
    client.upload_image(b"not a png at all", name="broken.png")
    prompt_id = client.queue_prompt(smoke_prompt("sinkwatch/broken.png"))
    clock = FakeClock()
    assert client.wait(prompt_id, timeout=60, poll=0.1, sleep=clock.sleep, clock=clock) == "error"
    entry = client.history(prompt_id)
    assert entry is not None
    events = [name for name, _data in entry["status"]["messages"]]
    assert "execution_error" in events and "execution_success" not in events
    assert entry["outputs"] == {}


def test_queue_ids_are_the_running_and_waiting_prompts_and_failure_of_reads_what_went_wrong(
    comfy: FakeComfyUI, client: ComfyClient, photo_png: bytes
) -> None:
    good = client.queue_prompt(smoke_prompt(client.upload_image(photo_png, name="good.png").reference))
    client.upload_image(b"not a png at all", name="broken.png")
    bad = client.queue_prompt(smoke_prompt("sinkwatch/broken.png"))
    assert client.queue_ids() == ({good}, {bad}), "the first one runs"
    comfy.run_queued()
    assert client.queue_ids() == (set(), set())
    ran, failed = client.history(good), client.history(bad)
    assert ran is not None and failed is not None
    assert failure_of(ran) == ""
    said = failure_of(failed)
    assert said.startswith("UnidentifiedImageError: cannot identify image file") and said.endswith("(in LoadImage)")
    comfy.restart()
    assert client.queue_ids() == (set(), set()) and client.history(good) is None and client.history(bad) is None


@pytest.mark.parametrize(
    ("entry", "said"),
    [
        ({}, ""),
        ({"status": "error"}, ""),
        ({"status": {"messages": "x"}}, ""),
        ({"status": {"messages": [["execution_error", "not a mapping"]]}}, ""),
        ({"status": {"messages": [["execution_error", {"exception_message": "out of memory\n"}]]}}, "out of memory"),
        (
            {"status": {"messages": [["execution_start", {}], ["execution_error", {"exception_type": "OOM"}]]}},
            "OOM",
        ),
    ],
)
def test_failure_of_takes_what_a_history_entry_offers(entry: dict[str, Any], said: str) -> None:
    assert failure_of(entry) == said


def test_wait_gives_up_at_its_deadline(comfy: FakeComfyUI, photo_png: bytes) -> None:
    comfy.pending_polls = 10_000
    client = ComfyClient(comfy.url)
    uploaded = client.upload_image(photo_png, name="astronaut_0001.png")
    prompt_id = client.queue_prompt(smoke_prompt(uploaded.reference))
    clock = FakeClock()
    with pytest.raises(ComfyPending) as caught:
        client.wait(prompt_id, timeout=2.0, poll=0.5, sleep=clock.sleep, clock=clock)
    assert caught.value.transient
    assert clock.sleeps == [0.5, 0.5, 0.5, 0.5]
    assert comfy.requests.count(("GET", f"/history/{prompt_id}")) == 5


def test_an_identical_prompt_is_cached_only_until_another_one_runs(
    comfy: FakeComfyUI, client: ComfyClient, photo_png: bytes
) -> None:
    clock = FakeClock()
    uploaded = client.upload_image(photo_png, name="astronaut_0001.png")
    prompt = smoke_prompt(uploaded.reference)
    first = client.queue_prompt(prompt)
    second = client.queue_prompt(prompt)
    assert first != second
    for prompt_id in (first, second):
        assert client.wait(prompt_id, timeout=60, poll=0.1, sleep=clock.sleep, clock=clock) == "success"
    assert comfy.executions == 1
    assert len(list((comfy.output_dir / "sinkwatch").iterdir())) == 1

    client.upload_image(photo_file("chelsea").read_bytes(), name="astronaut_0001.png")  # same name, new content
    third = client.queue_prompt(prompt)
    assert client.wait(third, timeout=60, poll=0.1, sleep=clock.sleep, clock=clock) == "success"
    assert comfy.executions == 2

    # Back to the first content: ComfyUI's cache kept only the prompt that ran last, so it runs again.
    client.upload_image(photo_png, name="astronaut_0001.png")
    fourth = client.queue_prompt(prompt)
    assert client.wait(fourth, timeout=60, poll=0.1, sleep=clock.sleep, clock=clock) == "success"
    assert comfy.executions == 3
    assert len(list((comfy.output_dir / "sinkwatch").iterdir())) == 3


# --- ComfyUI down -------------------------------------------------------------------------------


@pytest.mark.parametrize("call", ["upload", "prompt", "history"])
def test_connection_refused_is_unavailable(call: str) -> None:
    client = ComfyClient(closed_port_url(), timeout=2.0)
    with pytest.raises(ComfyUnavailable) as caught:
        if call == "upload":
            client.upload_image(b"x", name="frame.png")
        elif call == "prompt":
            client.queue_prompt({"1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}}})
        else:
            client.history("some-id")
    error = caught.value
    assert (error.reason, error.transient, error.status) == ("comfyui_down", True, None)
    url = error.as_record()["url"]
    assert isinstance(url, str) and url.startswith(client.base_url)


def test_a_hung_server_times_out_as_unavailable(comfy: FakeComfyUI) -> None:
    comfy.stall()
    client = ComfyClient(comfy.url, timeout=0.2)
    with pytest.raises(ComfyUnavailable, match=r"did not answer POST /upload/image within 0\.2s"):
        client.upload_image(b"x", name="frame.png")


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_errors_are_unavailable(comfy: FakeComfyUI, client: ComfyClient, status: int) -> None:
    comfy.fail_next(status)
    with pytest.raises(ComfyUnavailable) as caught:
        client.history("some-id")
    assert caught.value.status == status


@pytest.mark.parametrize(
    ("status", "reason"),
    [(401, "Unauthorized"), (403, "Forbidden"), (404, "Not Found"), (405, "Method Not Allowed"), (409, "Conflict")],
)
def test_a_4xx_comfyui_does_not_give_is_unavailable_with_a_hint(
    comfy: FakeComfyUI, client: ComfyClient, status: int, reason: str
) -> None:
    # What a wrong path prefix or another web server (404), or an auth proxy (401/403) answers.
    comfy.answer_next(status, headers={"Content-Type": "text/html"}, body=b"<html>nope</html>")
    with pytest.raises(ComfyUnavailable) as caught:
        client.upload_image(b"x", name="frame.png")
    error = caught.value
    assert (error.status, error.transient, error.reason) == (status, True, "comfyui_down")
    assert f"answered {status} {reason} to POST /upload/image" in str(error)
    assert "check --comfyui-url" in str(error)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_not_followed_and_is_unavailable_with_its_target(
    comfy: FakeComfyUI, client: ComfyClient, status: int
) -> None:
    target = comfy.url + "/upload/image"  # a followed 301/302/303 would arrive there as a GET
    comfy.answer_next(status, headers={"Location": target})
    with pytest.raises(ComfyUnavailable) as caught:
        client.upload_image(b"x", name="frame.png")
    assert caught.value.status == status
    assert f"a redirect to {target}" in str(caught.value) and "check --comfyui-url" in str(caught.value)
    assert comfy.requests == [("POST", "/upload/image")], "nothing followed the redirect"


def test_413_is_a_rejection_like_400(comfy: FakeComfyUI, client: ComfyClient) -> None:
    comfy.fail_next(413)
    with pytest.raises(ComfyRejected) as caught:
        client.upload_image(b"x", name="frame.png")
    assert (caught.value.status, caught.value.transient) == (413, False)


def test_a_non_comfyui_answer_is_unavailable_not_a_crash(comfy: FakeComfyUI, client: ComfyClient) -> None:
    comfy.fail_next(200)  # the fake then answers with a body that is not ComfyUI's
    with pytest.raises(ComfyUnavailable, match="not a ComfyUI answer"):
        client.upload_image(b"x", name="frame.png")


# --- end to end ---------------------------------------------------------------------------------


def test_a_real_photo_goes_through_upload_queue_and_history(
    comfy: FakeComfyUI, client: ComfyClient, photo_png: bytes
) -> None:
    uploaded = client.upload_image(photo_png, name="astronaut_0001.png")
    prompt = smoke_prompt(uploaded.reference)
    queued = client.submit(prompt)
    assert queued.node_errors == {}
    clock = FakeClock()
    assert client.wait(queued.prompt_id, timeout=60, poll=0.1, sleep=clock.sleep, clock=clock) == "success"

    entry = client.history(queued.prompt_id)
    assert entry is not None
    assert entry["prompt"][3] == {"client_id": client.client_id}
    saved = entry["outputs"]["2"]["images"][0]
    assert saved["type"] == "output" and saved["filename"] == "smoke_00001_.png"
    path = comfy.output_dir / saved["subfolder"] / saved["filename"]
    with Image.open(path) as result, Image.open(photo_file("astronaut")) as original:
        assert np.array_equal(np.asarray(result.convert("RGB")), np.asarray(original.convert("RGB")))
        assert isinstance(result, PngImagePlugin.PngImageFile)
        assert json.loads(result.text["prompt"])["1"]["inputs"]["image"] == "sinkwatch/astronaut_0001.png"


class _RecordingComfyUI(FakeComfyUI):
    """Notes the Authorization header of every request."""

    def __init__(self) -> None:
        super().__init__()
        self.authorizations: list[str | None] = []

    def handle(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, object | None]:
        self.authorizations.append(headers.get("Authorization"))
        return super().handle(method, path, headers, body)


def test_credentials_in_the_url_are_sent_as_basic_auth_and_never_shown(photo_png: bytes) -> None:
    comfy = _RecordingComfyUI()
    with comfy:
        host = comfy.url.removeprefix("http://")
        client = ComfyClient(f"http://me:s%40cret@{host}/", timeout=5.0)
        assert client.base_url == comfy.url, "messages and log lines name the URL without the password"
        assert client.upload_image(photo_png, name="frame.png").name == "frame.png"
        comfy.fail_next(500)
        with pytest.raises(ComfyUnavailable) as down:
            client.upload_image(photo_png, name="frame.png")
    assert "s@cret" not in str(down.value) and "s%40cret" not in str(down.value)
    assert comfy.authorizations == ["Basic " + base64.b64encode(b"me:s@cret").decode()] * 2


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("user:s3cret@host:8188", "host:8188"),
        ("ftp://user:s3cret@host:8188", "ftp://host:8188"),
        ("http//user:s3cret@host:8188", "http//host:8188"),
    ],
)
def test_a_malformed_url_is_refused_without_showing_its_password(url: str, shown: str) -> None:
    with pytest.raises(ConfigError) as refused:
        ComfyClient(url)
    assert "s3cret" not in str(refused.value) and f"got {shown!r}" in str(refused.value)
