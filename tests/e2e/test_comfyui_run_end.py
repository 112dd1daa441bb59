"""How a run that ends (`process`, `run --once`) waits for ComfyUI and says what it refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.conftest import frames
from tests.e2e.test_comfyui_e2e import SMOKE, drop, end_run
from tests.fake_comfyui import FakeComfyUI


def broken_template(folder: Path) -> Path:
    """The smoke-test template with its Save Image node swapped for a node this ComfyUI does not have."""
    prompt = json.loads(SMOKE.read_text(encoding="utf-8"))
    for node in prompt.values():
        if node["class_type"] == "SaveImage":
            node["class_type"] = "RIFE VFI"
    path = folder / "broken-api.json"
    path.write_text(json.dumps(prompt), encoding="utf-8")
    return path


@pytest.mark.parametrize("command", ["process", "once"])
def test_a_refused_workflow_exits_1_and_process_force_sends_it_again_once_fixed(
    command: str, folders: tuple[Path, Path], photos: dict[str, np.ndarray], tmp_path: Path
) -> None:
    watch, queue = folders
    source = drop(watch, 0, photos)
    with FakeComfyUI() as comfy:
        flags = ("--queue", str(queue), "--comfyui-url", comfy.url, "--metrics-port", "0")
        done = end_run(command, watch, [source], (*flags, "--comfyui-workflow", str(broken_template(tmp_path))))
        assert done.returncode == 1, done.stderr[-4000:]
        assert "ComfyUI rejected the workflow" in done.stderr and "RIFE VFI" in done.stderr
        if command == "process":
            assert "0 uploads owed to ComfyUI, 1 failed for good" in done.stderr
        assert len(frames(queue)) == 1, "the local frame is published whatever ComfyUI says"
        assert comfy.prompts == []

        again = end_run("process", watch, [source], (*flags, "--comfyui-workflow", str(SMOKE), "--force"))
        assert again.returncode == 0, again.stderr[-4000:]
        assert "0 uploads owed to ComfyUI, 0 failed for good" in again.stderr
        assert len(comfy.prompts) == 1, "the fixed template is queued for the frame"


@pytest.mark.parametrize("command", ["process", "once"])
def test_one_failed_answer_from_comfyui_is_retried_before_a_run_ends(
    command: str, folders: tuple[Path, Path], photos: dict[str, np.ndarray]
) -> None:
    watch, queue = folders
    source = drop(watch, 0, photos)
    with FakeComfyUI() as comfy:
        comfy.fail_next(500, path="/upload/image")
        flags = ("--queue", str(queue), "--comfyui-url", comfy.url, "--comfyui-workflow", str(SMOKE))
        done = end_run(command, watch, [source], (*flags, "--metrics-port", "0"))
        assert done.returncode == 0, done.stderr[-4000:]
        assert "ComfyUI is down" in done.stderr and "ComfyUI is back" in done.stderr
        assert len(comfy.prompts) == 1
