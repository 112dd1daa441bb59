"""A sinkwatch that watches ComfyUI's output folder leaves what its video jobs save there alone.

The fake ComfyUI runs the queued workflow for real: its Save Image writes the
job's image into ``output/`` with the prompt embedded, as Video Helper
Suite's Video Combine writes a video's first frame there. Taken for a new
image, it would be published and queued in its turn, for ever.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from tests.conftest import wait_for
from tests.e2e.conftest import DaemonProcess, frames, run_sinkwatch
from tests.e2e.test_comfyui_e2e import SMOKE, counter, drop, promtool_check
from tests.fake_comfyui import FakeComfyUI

IGNORED = "ignored {}: ComfyUI made it from sinkwatch's frame {} (its prompt loads that frame)"


def video_workflow(tmp_path: Path) -> Path:
    """The smoke template saving at the top of ``output/``, where Video Combine saves a video's first frame."""
    workflow = json.loads(SMOKE.read_text(encoding="utf-8"))
    workflow["2"]["inputs"]["filename_prefix"] = "video"
    path = tmp_path / "video-api.json"
    path.write_text(json.dumps(workflow), encoding="utf-8")
    return path


def test_an_image_a_queued_video_job_saves_in_the_watched_folder_queues_no_video_of_its_own(
    tmp_path: Path, photos: dict[str, np.ndarray]
) -> None:
    queue = tmp_path / "queue"
    with FakeComfyUI(pending_polls=10**9) as comfy:
        watch = comfy.output_dir  # the generator saves here, and so do the video jobs
        daemon = DaemonProcess(
            watch, queue, tmp_path / "daemon.log", "--comfyui-url", comfy.url, "--comfyui-workflow",
            str(video_workflow(tmp_path)),
        )  # fmt: skip
        daemon.start()
        try:
            source = drop(watch, 0, photos)
            wait_for(lambda: counter(daemon, "sinkwatch_comfyui_prompts_total", "queued") == 1, timeout=90)
            # The generator saves over it while its video waits: a new frame, a second job, on its own version.
            Image.fromarray(photos["coffee"]).save(source, compress_level=4)
            wait_for(lambda: counter(daemon, "sinkwatch_comfyui_prompts_total", "queued") == 2, timeout=90)
            comfy.run_queued()
            made = [watch / "video_00001_.png", watch / "video_00002_.png"]
            assert all(path.is_file() for path in made), "each job saved its image where the generator saves"
            wait_for(lambda: counter(daemon, "sinkwatch_images_processed_total", "ignored") == 2)

            assert [frame.name for frame in frames(queue)] == [f"{source.stem}.png"]
            assert len(comfy.prompts) == 2, "no video of a video"
            for path in made:
                message = IGNORED.format(path.name, f"{source.stem}.png")
                assert any(line.startswith(message) for line in daemon.messages()), daemon.messages()[-5:]
            assert counter(daemon, "sinkwatch_images_processed_total", "rejected") == 0
            promtool_check(daemon)
        finally:
            assert daemon.stop() == 0, daemon.log.read_text()[-3000:]


def first_frame_of(frame: Path, path: Path) -> Path:
    """What Video Combine saves beside the video it made from `frame`: the first frame, with the prompt."""
    info = PngInfo()
    info.add_text("prompt", json.dumps({"1": {"class_type": "LoadImage", "inputs": {"image": frame.name}}}))
    with Image.open(frame) as image:
        image.convert("RGB").save(path, pnginfo=info, compress_level=4)
    return path


def test_process_ignores_such_an_image_says_so_and_exits_0(
    folders: tuple[Path, Path], photos: dict[str, np.ndarray], tmp_path: Path
) -> None:
    watch, queue = folders
    source = drop(watch, 0, photos)
    done = run_sinkwatch("process", str(source), "--queue", str(queue), "--metrics-port", "0", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (frame,) = frames(queue)

    made = first_frame_of(frame, watch / "AnimateDiff_00001.png")
    again = run_sinkwatch("process", str(made), "--queue", str(queue), "--metrics-port", "0", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 rejected, 1 ignored (made from sinkwatch's frames), 0 unfinished" in again.stderr
    assert frames(queue) == [frame]
