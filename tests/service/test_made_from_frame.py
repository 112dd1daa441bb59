"""Images ComfyUI made from sinkwatch's own frames are left alone: no frame of a video's frame, no endless loop.

A real photo is published first (frame ``cat``); the video outputs are made
the way ComfyUI's nodes save them: Video Helper Suite's first-frame PNG (a
``prompt`` text chunk) and SaveAnimatedWEBP's animated WebP (the prompt and
workflow as EXIF strings), each with a prompt whose Load Image reads the frame.
"""

from __future__ import annotations

import io
import json
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from loguru import logger
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from service import made_from_frame
from service.decode import decode_bytes, decode_file
from service.errors import REJECT_REASONS
from service.file_hash import sha256_file
from service.ledger import Ledger
from service.made_from_frame import LOCAL, FrameRefs, loaded_frame, sibling_text
from service.metrics import Metrics
from service.publish import Publisher
from service.runner import Rejection, process_job
from service.settings import load_settings
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
    assert entry.message is not None and entry.message.startswith(message)
    assert not Publisher(bench.queue).reject_path("AnimateDiff_00001").exists(), "no record among the failures"
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


def test_a_video_combine_webp_without_a_prompt_is_known_by_the_first_frame_png_written_beside_it(
    bench: Bench, published: Path
) -> None:
    # Video Combine's image/webp output carries no prompt; the PNG of its first frame, same name, does.
    video = bench.watch / "AnimateDiff_00001.webp"
    with Image.open(published) as image:
        first = image.convert("RGB")
    first.save(video, save_all=True, append_images=[first.rotate(2)], duration=62, quality=80)
    assert bench.run(video).status == "published", "alone, nothing tells what made it"

    first_frame_png(bench.watch / "AnimateDiff_00001.png", published, video_prompt("cat.png"))
    later = bench.watch / "AnimateDiff_00002.webp"
    later.write_bytes(video.read_bytes())
    first_frame_png(bench.watch / "AnimateDiff_00002.png", published, video_prompt("cat.png"))
    outcome = bench.run(later)
    assert (outcome.status, outcome.reason) == ("rejected", "from_frame")


def test_comfyuis_animated_png_decodes_and_is_ignored_when_made_from_a_frame(bench: Bench, published: Path) -> None:
    # SaveAnimatedPNG keeps the prompt in private "comf" chunks after the image data, which libpng refuses.
    def save_animated(path: Path, prompt: dict[str, Any]) -> Path:
        info = PngInfo()
        for key, value in (("prompt", prompt), ("workflow", WORKFLOW)):
            info.add(b"comf", key.encode("latin-1") + b"\0" + json.dumps(value).encode("latin-1"), after_idat=True)
        with Image.open(published) as image:
            first = image.convert("RGB")
        first.save(path, pnginfo=info, compress_level=4, save_all=True, duration=62, append_images=[first.rotate(2)])
        return path

    made = bench.run(save_animated(bench.watch / "ComfyUI_00001_.png", video_prompt("cat.png")))
    assert (made.status, made.reason) == ("rejected", "from_frame")
    generated = save_animated(bench.watch / "ComfyUI_00002_.png", video_prompt("reference.png"))
    assert bench.run(generated).status == "published"
    sidecar = json.loads(Publisher(bench.queue).sidecar_path("ComfyUI_00002_").read_text(encoding="utf-8"))
    assert json.loads(sidecar["source"]["metadata"]["prompt"]) == video_prompt("reference.png")
    assert bench.counted() == {"published": 2, "ignored": 1}


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L"])
@pytest.mark.parametrize("frames", [1, 2])
def test_a_png_with_comfyuis_comf_chunks_decodes_as_pillow_reads_it(mode: str, frames: int) -> None:
    # libpng refuses a chunk whose name has the reserved bit set ("comf"); Pillow, ComfyUI's reader, passes over it.
    image = Image.fromarray(load_photo("coffee")[:96, :128]).convert(mode)
    info = PngInfo()
    info.add(b"comf", b"prompt\0" + json.dumps(video_prompt("cat.png")).encode("latin-1"), after_idat=True)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, save_all=frames > 1, append_images=[image.rotate(3)] * (frames - 1))
    decoded = decode_bytes(buffer.getvalue(), path="ComfyUI_00001_.png", max_pixels=10**8)
    with Image.open(io.BytesIO(buffer.getvalue())) as shown:
        expected = np.asarray(shown.convert("RGB"))
    assert np.array_equal(decoded.rgb, expected)
    assert json.loads(decoded.text["prompt"]) == video_prompt("cat.png")


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


REMOTE = FrameRefs(top_level=False, upload_folder="sinkwatch")  # uploaded into input/sinkwatch/
TOP = FrameRefs(top_level=False, upload_folder="")  # uploaded to the top of input/
BOTH = FrameRefs(top_level=True, upload_folder="sinkwatch")  # the queue is input/, and uploads go to it too


def made_from(image: str, published: Path, refs: FrameRefs, *, saved_as: str = "AnimateDiff_00001.png") -> str | None:
    """The frame `loaded_frame` finds in the prompt of a video job that loads `image`, saved as `saved_as`."""
    text = {"prompt": json.dumps(video_prompt(image))}
    return loaded_frame(text, published.parent / saved_as, Publisher(published.parent), refs)


@pytest.mark.parametrize(
    ("refs", "image", "frame"),
    [
        (LOCAL, "cat.png", "cat"),  # Load Image of the frame in ComfyUI's input/ (the queue)
        (LOCAL, "cat.png [input]", "cat"),  # the same, annotated
        (LOCAL, "cat.png [output]", None),  # a file of that name in output/: not the frame
        (LOCAL, "pose/cat.png", None),  # a picture of the user's in a subfolder of input/
        (LOCAL, "../cat.png", None),
        (LOCAL, "dog.png", None),  # no such frame
        (LOCAL, "cat.jpg", None),
        (LOCAL, ".cat.png", None),  # a name sinkwatch never gives
        (LOCAL, "sinkwatch/cat-0123abcd.png", None),  # nothing is uploaded
        (REMOTE, "cat.png", None),  # the remote input/ is not the queue: a picture of the user's there
        (REMOTE, "sinkwatch/cat.png", "cat"),  # the upload, in sinkwatch's own subfolder
        (REMOTE, "sinkwatch\\cat.png", "cat"),  # as a Windows ComfyUI may write it
        (REMOTE, "sinkwatch/cat-0123abcd.png", "cat"),  # a version of the frame, whichever (a frame republished since)
        (REMOTE, "other/cat-0123abcd.png", None),
        (REMOTE, "sinkwatch/dog-0123abcd.png", None),
        (TOP, "cat-0123abcd.png", "cat"),  # a version at the top of input/: sinkwatch's name
        (TOP, "cat.png", None),  # at the top level, anyone's file may have that name
        (TOP, "cat (1).png", None),  # and ComfyUI renames whichever came second
        (BOTH, "cat.png", "cat"),
        (BOTH, "sinkwatch/cat-0123abcd.png", "cat"),
    ],
)
def test_a_prompt_is_made_from_a_frame_when_it_loads_it_by_a_name_comfyui_knows_it_by(
    published: Path, refs: FrameRefs, image: str, frame: str | None
) -> None:
    assert made_from(image, published, refs) == frame


@pytest.mark.parametrize("upload", ["cat.png", "cat (1).png", "cat-0123abcd (2).png"])
def test_an_upload_comfyui_renamed_is_the_frame_when_the_sidecar_records_it(published: Path, upload: str) -> None:
    frame_sha256 = sha256_file(published)
    note = {"upload": upload, "prompt_id": None}
    assert note_upload(Publisher(published.parent), Metrics(), "cat", frame_sha256=frame_sha256, note=note)
    assert made_from(upload, published, TOP) == "cat"
    assert made_from(f"other/{upload}", published, TOP) is None


@pytest.mark.parametrize(
    ("generator", "video", "saved_as", "frame"),
    [
        ("ComfyUI", "AnimateDiff", "output/ComfyUI_00003_.png", None),  # a new image of the generator
        ("ComfyUI", "AnimateDiff", "output/AnimateDiff_00001.png", "cat"),
        ("ComfyUI", "AnimateDiff", "output/AnimateDiff_00001.webp", "cat"),
        ("ComfyUI", "AnimateDiff", "output/renamed.png", "cat"),  # no saver names it: the whole prompt
        ("ComfyUI", "video/ComfyUI", "output/ComfyUI_00003_.png", None),  # the video's saver writes to video/
        ("ComfyUI", "video/ComfyUI", "output/video/ComfyUI_00001_.png", "cat"),
        ("gen/ComfyUI", "AnimateDiff", "output/gen/ComfyUI_00003_.png", None),
        ("gen/ComfyUI", "AnimateDiff", "output/ComfyUI_00003_.png", "cat"),  # not where that saver writes
        ("ComfyUI", "AnimateDiff_%date:yyMMdd%", "output/ComfyUI_00003_.png", "cat"),  # a pattern: the whole prompt
        ("ComfyUI", ["9", 0], "output/ComfyUI_00003_.png", "cat"),  # a prefix from another node: the same
    ],
)
def test_only_the_branch_of_the_prompt_that_saved_the_image_counts(
    published: Path, generator: str, video: object, saved_as: str, frame: str | None
) -> None:
    # One canvas: a text-to-image branch, and a video branch on the frame, each with its saver.
    prompt = {
        **video_prompt("cat.png"),
        "4": {"class_type": "KSampler", "inputs": {"seed": 7}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": generator}},
    }
    prompt["3"]["inputs"]["filename_prefix"] = video
    text = {"prompt": json.dumps(prompt)}
    assert loaded_frame(text, Path(saved_as), Publisher(published.parent), LOCAL) == frame


def test_a_prompt_naming_frames_a_hundred_thousand_times_is_looked_into_a_bounded_number_of_times(
    published: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    looked: list[str] = []
    real = made_from_frame._published

    def published_counted(publisher: Publisher, name: str) -> bool:
        looked.append(name)
        return real(publisher, name)

    monkeypatch.setattr(made_from_frame, "_published", published_counted)
    same = {f"s{i}": {"class_type": "LoadImage", "inputs": {"image": "sinkwatch/x-0123abcd.png"}} for i in range(10**5)}
    other = {
        f"{i}": {"class_type": "LoadImage", "inputs": {"image": f"sinkwatch/x{i}-0123abcd.png"}} for i in range(10**5)
    }
    text = {"prompt": json.dumps({**same, **other})}
    assert loaded_frame(text, published.parent / "x.png", Publisher(published.parent), REMOTE) is None
    # Each name is looked up under a few names of its own, the same name once, and 256 names at most.
    assert 256 <= len(looked) <= 4 * 256


@pytest.mark.parametrize(
    "prompt",
    [
        None,
        "not JSON, cat.png",
        '["cat.png"]',
        '{"1": "cat.png"}',
        '{"1": {"inputs": ["cat.png"]}}',
        '{"1": {"inputs": {"image": ["cat.png", 0]}}}',
        '{"1": {"inputs": {"image": "x.png", "filename_prefix": "x", "a": [["2"], 0], "b": [{}, 1]}}}',
        "[" * 100_000 + '"cat.png"' + "]" * 100_000,
    ],
)
def test_a_prompt_of_any_other_shape_loads_no_frame(published: Path, prompt: str | None) -> None:
    text = {} if prompt is None else {"prompt": prompt}
    assert loaded_frame(text, published.parent / "x_00001_.png", Publisher(published.parent), LOCAL) is None


def test_a_fifo_or_a_folder_named_like_the_first_frame_png_is_not_read(tmp_path: Path) -> None:
    video = tmp_path / "AnimateDiff_00001.webp"
    fifo = tmp_path / "AnimateDiff_00001.png"
    os.mkfifo(fifo)
    found: list[dict[str, str]] = []
    reader = threading.Thread(target=lambda: found.append(sibling_text(video)))
    reader.start()
    reader.join(10)
    hung = reader.is_alive()
    if hung:  # a writer ends the wait of a reader blocked in open()
        with open(fifo, "wb"):
            reader.join()
    assert not hung, "waited for a writer of the FIFO"
    assert found == [{}]
    fifo.unlink()
    fifo.mkdir()
    assert sibling_text(video) == {}


def test_the_names_of_a_prompt_are_looked_up_in_its_order_up_to_a_bound(published: Path) -> None:
    def prompt(at: int) -> dict[str, str]:
        graph: dict[str, Any] = {
            f"{i}": {"class_type": "LoadImage", "inputs": {"image": "cat.png" if i == at else f"x{i}.png"}}
            for i in range(400)
        }
        graph["saver"] = {"class_type": "VHS_VideoCombine", "inputs": {"filename_prefix": "AnimateDiff"}}
        graph["saver"]["inputs"].update({f"image{i}": [f"{i}", 0] for i in range(400)})
        return {"prompt": json.dumps(graph)}

    source, publisher = Path("output/AnimateDiff_00001.png"), Publisher(published.parent)
    assert loaded_frame(prompt(10), source, publisher, LOCAL) == "cat"
    assert loaded_frame(prompt(300), source, publisher, LOCAL) is None, "past the first 256 names"


def test_the_settings_say_how_comfyui_names_the_frames(tmp_path: Path) -> None:
    url = "http://127.0.0.1:8188"
    assert load_settings().frame_refs == LOCAL
    assert load_settings(flags={"comfyui_url": url}).frame_refs == REMOTE
    assert load_settings(flags={"comfyui_url": url, "comfyui_subfolder": ""}).frame_refs == TOP
    both = load_settings(flags={"comfyui_url": url, "comfyui_input": str(tmp_path)})
    assert both.frame_refs == BOTH
    # As the client names the subfolder to ComfyUI, and so the uploads.
    assert load_settings(flags={"comfyui_url": url, "comfyui_subfolder": "./sinkwatch"}).frame_refs == REMOTE
    assert load_settings(flags={"comfyui_url": url, "comfyui_subfolder": "."}).frame_refs == TOP
    nested = load_settings(flags={"comfyui_url": url, "comfyui_subfolder": "a//b/"}).frame_refs
    assert nested == FrameRefs(top_level=False, upload_folder="a/b")
