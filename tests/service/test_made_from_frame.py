"""Images ComfyUI made from sinkwatch's own frames are left alone: no frame of a video's frame, no endless loop.

A real photo is published first (frame ``cat``); the video outputs are made
the way ComfyUI's nodes save them: Video Helper Suite's first-frame PNG (a
``prompt`` text chunk) and SaveAnimatedWEBP's animated WebP (the prompt and
workflow as EXIF strings), each with a prompt whose Load Image reads the frame.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from loguru import logger
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from service.decode import decode_file
from service.errors import REJECT_REASONS
from service.file_hash import sha256_file
from service.ledger import Ledger
from service.made_from_frame import loaded_frame
from service.metrics import Metrics
from service.publish import Publisher
from service.runner import Rejection, process_job
from service.upload_note import note_upload
from service.webp_text import comfyui_text
from tests.conftest import load_photo
from tests.service.test_outcomes import Bench

WORKFLOW = {"last_node_id": 3, "nodes": [{"id": 3, "type": "VHS_VideoCombine"}], "links": [], "version": 0.4}


def video_prompt(image: str) -> dict[str, Any]:
    """A Wan I2V prompt as ComfyUI embeds it: Load Image of `image`, the video node, the saver."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "WanImageToVideo", "inputs": {"width": 832, "height": 480, "start_image": ["1", 0]}},
        "3": {
            "class_type": "VHS_VideoCombine",
            "inputs": {
                "images": ["2", 0],
                "frame_rate": 16,
                "filename_prefix": "AnimateDiff",
                "format": "video/h264-mp4",
            },
        },
    }


def first_frame_png(path: Path, frame: Path, prompt: dict[str, Any]) -> Path:
    """What Video Combine saves beside its video: the first frame, as PNG, with the prompt and workflow."""
    info = PngInfo()
    info.add_text("prompt", json.dumps(prompt))
    info.add_text("workflow", json.dumps(WORKFLOW))
    with Image.open(frame) as image:
        image.convert("RGB").save(path, pnginfo=info, compress_level=4)
    return path


def comfyui_exif(prompt: dict[str, Any], workflow: dict[str, Any]) -> Image.Exif:
    """What SaveAnimatedWEBP writes: the prompt at EXIF Model (0x0110), the workflow at Make (0x010F)."""
    exif = Image.Exif()
    exif[0x0110] = f"prompt:{json.dumps(prompt)}"
    exif[0x010F] = f"workflow:{json.dumps(workflow)}"
    return exif


def animated_webp(path: Path, frame: Path, prompt: dict[str, Any]) -> Path:
    """A short video saved as SaveAnimatedWEBP saves it (lossy, quality 80, method 4)."""
    with Image.open(frame) as image:
        first = image.convert("RGB")
    frames = [first, first.rotate(2), first.rotate(4)]
    frames[0].save(
        path,
        save_all=True,
        append_images=frames[1:],
        duration=62,
        exif=comfyui_exif(prompt, WORKFLOW),
        lossless=False,
        quality=80,
        method=4,
    )
    return path


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Bench]:
    with Ledger(tmp_path / "ledger.sqlite3") as ledger:
        yield Bench(tmp_path, ledger)


@pytest.fixture
def published(bench: Bench) -> Path:
    """The frame ``cat.png`` in the queue, published from a real photo."""
    assert bench.run(bench.photo("cat.png")).status == "published"
    return Publisher(bench.queue).frame_path("cat")


@pytest.fixture
def said() -> Iterator[list[tuple[str, str]]]:
    lines: list[tuple[str, str]] = []
    sink = logger.add(lambda message: lines.append((message.record["level"].name, message.record["message"])))
    yield lines
    logger.remove(sink)


def test_a_video_jobs_first_frame_is_ignored_counted_apart_and_not_decoded_again(
    bench: Bench, published: Path, said: list[tuple[str, str]]
) -> None:
    source = first_frame_png(bench.watch / "AnimateDiff_00001.png", published, video_prompt("cat.png"))
    outcome = bench.run(source)
    assert (outcome.status, outcome.reason) == ("rejected", "from_frame")
    assert not Publisher(bench.queue).frame_path("AnimateDiff_00001").exists(), "a frame of a video's frame"
    assert bench.counted() == {"published": 1, "ignored": 1}
    for reason in (*REJECT_REASONS, "from_frame"):
        assert not bench.sample("sinkwatch_rejections_total", reason=reason), reason
    entry = bench.entry("AnimateDiff_00001.png")
    assert (entry.state, entry.reason, entry.sha256) == ("rejected", "from_frame", sha256_file(source))
    message = "ComfyUI made it from sinkwatch's frame cat.png (its prompt loads that frame)"
    assert bench.reject_record("AnimateDiff_00001")["message"].startswith(message)
    assert [(level, line) for level, line in said if "AnimateDiff" in line] == [
        ("INFO", f"ignored AnimateDiff_00001.png: {message}: what a video job saved, not a new start frame")
    ]

    # A touch: the same bytes are not read again (the engine hands the job its rejection), nothing counts as new.
    st = source.stat()
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    job = replace(bench.start(source), rejected_as=Rejection("from_frame", str(entry.sha256), str(entry.message)))
    again = process_job(job)
    bench.outcomes.handle(job, again, seen_at=None)
    assert (again.status, (again.error or {}).get("error")) == ("rejected", "Unchanged")
    assert "decode" not in again.timings
    assert bench.counted() == {"published": 1, "ignored": 1, "skipped": 1}


def test_a_video_saved_as_an_animated_webp_by_comfyui_is_ignored(bench: Bench, published: Path) -> None:
    source = animated_webp(bench.watch / "ComfyUI_00001_.webp", published, video_prompt("cat.png [input]"))
    outcome = bench.run(source)
    assert (outcome.status, outcome.reason) == ("rejected", "from_frame")
    assert bench.counted() == {"published": 1, "ignored": 1}


def test_a_generator_image_whose_prompt_loads_no_frame_is_published_with_its_webp_metadata(
    bench: Bench, published: Path
) -> None:
    # An image-to-image generator reading a picture of the user's from input/: not one of sinkwatch's frames.
    prompt = video_prompt("reference.png")
    (bench.queue / "reference.png").write_bytes(published.read_bytes())
    source = animated_webp(bench.watch / "ComfyUI_00002_.webp", published, prompt)
    assert bench.run(source).status == "published"
    sidecar = json.loads(Publisher(bench.queue).sidecar_path("ComfyUI_00002_").read_text(encoding="utf-8"))
    assert sidecar["source"]["metadata"] == {"prompt": json.dumps(prompt), "workflow": json.dumps(WORKFLOW)}


def test_the_webp_text_is_capped_like_png_text_and_a_damaged_exif_block_has_none(tmp_path: Path) -> None:
    huge = {"1": {"class_type": "Note", "inputs": {"text": "x" * (4 << 20)}}}
    exif = comfyui_exif(huge, WORKFLOW).tobytes()
    assert comfyui_text(exif) == ({"workflow": json.dumps(WORKFLOW)}, ("prompt",))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns of the tag it skips
        assert "prompt" not in comfyui_text(exif[: len(exif) // 2])[0], "a prompt cut short"
    assert comfyui_text(b"Exif\0\0garbage") == ({}, ())
    assert comfyui_text(None) == ({}, ())
    # The decoder hands the text on, as it does a PNG's.
    path = tmp_path / "still.webp"
    Image.fromarray(load_photo("chelsea")).save(path, exif=comfyui_exif(video_prompt("x.png"), WORKFLOW), quality=80)
    decoded = decode_file(path, max_bytes=1 << 30, max_pixels=1 << 30)
    assert json.loads(decoded.text["prompt"]) == video_prompt("x.png")
    assert set(decoded.text) == {"prompt", "workflow"}


def frame_sha256(published: Path) -> str:
    found = sha256_file(published)
    assert found is not None
    return found


@pytest.mark.parametrize(
    ("image", "made_from"),
    [
        ("cat.png", "cat"),  # Load Image of the frame in ComfyUI's input/ (the queue)
        ("cat.png [input]", "cat"),  # the same, annotated
        ("cat.png [output]", None),  # a file of that name in output/: not the frame
        ("pose/cat.png", None),  # a picture of the user's in a subfolder of input/
        ("../cat.png", None),
        ("dog.png", None),  # no such frame
        ("cat.jpg", None),
        (".cat.png", None),  # a name sinkwatch never gives
        ("sinkwatch/cat-{sha8}.png", "cat"),  # the version of the frame sinkwatch uploaded with a workflow
        ("sinkwatch/cat-00000000.png", None),  # a version of another frame of that name
        ("sinkwatch/cat.png", None),  # an upload nobody noted
    ],
)
def test_a_prompt_is_made_from_a_frame_when_it_loads_that_frame_or_its_upload(
    published: Path, image: str, made_from: str | None
) -> None:
    image = image.format(sha8=frame_sha256(published)[:8])
    prompt = {"prompt": json.dumps(video_prompt(image))}
    assert loaded_frame(prompt, Publisher(published.parent)) == made_from


@pytest.mark.parametrize("upload", ["sinkwatch/cat.png", "cat (1).png", "frames/cat (2).png"])
def test_an_upload_the_sidecar_records_is_the_frame_whatever_comfyui_named_it(published: Path, upload: str) -> None:
    publisher = Publisher(published.parent)
    assert note_upload(
        publisher,
        Metrics(),
        "cat",
        frame_sha256=frame_sha256(published),
        note={"upload": upload, "prompt_id": None},
    )
    assert loaded_frame({"prompt": json.dumps(video_prompt(upload))}, publisher) == "cat"
    assert loaded_frame({"prompt": json.dumps(video_prompt(f"other/{upload}"))}, publisher) is None


@pytest.mark.parametrize(
    "prompt",
    [
        None,
        "not JSON, cat.png",
        '["cat.png"]',
        '{"1": "cat.png"}',
        '{"1": {"inputs": ["cat.png"]}}',
        '{"1": {"inputs": {"image": ["cat.png", 0]}}}',
        "[" * 100_000 + '"cat.png"' + "]" * 100_000,
    ],
)
def test_a_prompt_of_any_other_shape_loads_no_frame(published: Path, prompt: str | None) -> None:
    text = {} if prompt is None else {"prompt": prompt}
    assert loaded_frame(text, Publisher(published.parent)) is None
