"""Provenance: what a cleaned frame and its sidecar say about where they came from.

The source is a real photo saved the way ComfyUI's SaveImage saves it (PNG
with ``prompt`` and ``workflow`` text chunks); the job runs in-process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from service import runner
from service.decode import TEXT_VALUE_LIMIT
from service.rules import Rule, parse_rule
from service.runner import Job, Outcome, process_job
from tests.conftest import load_photo, photo_file

DEFAULT_RULE = Path(__file__).resolve().parents[2] / "rules" / "default.toml"
# What ComfyUI embeds: the API-format prompt, and the UI workflow (from the web UI), as JSON text.
PROMPT = json.dumps(
    {
        "3": {"class_type": "KSampler", "inputs": {"seed": 42, "model": ["4", 0], "positive": ["6", 0]}},
        "6": {
            "class_type": "CLIPTextEncode",
            "inputs": {"text": "a neon sign reading 東京 in the rain", "clip": ["4", 1]},
        },
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }
)
WORKFLOW = json.dumps({"last_node_id": 9, "nodes": [{"id": 9, "type": "SaveImage"}], "links": [], "version": 0.4})


def rule(*, keep: bool) -> Rule:
    """The shipped default rule, with ``output.keep_generator_metadata`` set as asked."""
    text = DEFAULT_RULE.read_text(encoding="utf-8")
    assert text.count("keep_generator_metadata = false") == 1
    return parse_rule(
        text.replace("keep_generator_metadata = false", f"keep_generator_metadata = {str(keep).lower()}"),
        file="default.toml",
    )


def comfyui_source(folder: Path, **extra: str) -> Path:
    """A real photo saved like SaveImage saves it: PNG, compress level 4, prompt and workflow chunks."""
    info = PngInfo()
    for key, value in {"prompt": PROMPT, "workflow": WORKFLOW, **extra}.items():
        info.add_text(key, value)
    path = folder / "watch" / "ComfyUI_00001_.png"
    path.parent.mkdir(parents=True)
    Image.fromarray(load_photo("chelsea")).save(path, pnginfo=info, compress_level=4)
    return path


def run(source: Path, chosen: Rule, queue: Path) -> Outcome:
    job = Job(
        source=source,
        key=source.name,
        name="frame",
        rule=chosen,
        queue=queue,
        max_bytes=64 * 1024 * 1024,
        max_pixels=50_000_000,
    )
    outcome = process_job(job)
    assert outcome.status == "published", outcome.error
    return outcome


def frame_text(queue: Path) -> dict[str, str]:
    with Image.open(queue / "frame.png") as image:
        image.load()
        return dict(image.text)  # type: ignore[attr-defined]


def sidecar(queue: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((queue / "matrix" / "frame.json").read_text(encoding="utf-8"))
    return data


def test_by_default_the_frame_drops_the_generator_chunks(tmp_path: Path) -> None:
    run(comfyui_source(tmp_path), rule(keep=False), tmp_path / "queue")
    assert set(frame_text(tmp_path / "queue")) == {"sinkwatch"}


def test_a_rule_that_keeps_generator_metadata_carries_prompt_and_workflow_unchanged(tmp_path: Path) -> None:
    run(comfyui_source(tmp_path), rule(keep=True), tmp_path / "queue")
    text = frame_text(tmp_path / "queue")
    assert set(text) == {"prompt", "workflow", "sinkwatch"}
    assert text["prompt"] == PROMPT, "non-Latin-1 text survives (iTXt)"
    assert text["workflow"] == WORKFLOW


def test_only_generator_chunks_are_kept_never_other_text(tmp_path: Path) -> None:
    source = comfyui_source(tmp_path, parameters="Steps: 20, Sampler: Euler a", Software="other tool")
    run(source, rule(keep=True), tmp_path / "queue")
    assert set(frame_text(tmp_path / "queue")) == {"prompt", "workflow", "sinkwatch"}


@pytest.mark.parametrize("keep", [False, True])
def test_the_sinkwatch_chunk_names_rule_fingerprint_and_scores(tmp_path: Path, keep: bool) -> None:
    chosen = rule(keep=keep)
    outcome = run(comfyui_source(tmp_path), chosen, tmp_path / "queue")
    provenance = json.loads(frame_text(tmp_path / "queue")["sinkwatch"])
    assert provenance["rule"] == chosen.name == "default"
    assert provenance["fingerprint"] == chosen.fingerprint
    assert provenance["scores"] == pytest.approx(dict(outcome.scores))
    assert provenance["scores"] == pytest.approx(sidecar(tmp_path / "queue")["scores"])
    for score in ("width", "height", "mask_coverage", "energy_mean_before", "energy_mean_after", "ssim"):
        assert score in provenance["scores"]
    assert (provenance["scores"]["width"], provenance["scores"]["height"]) == (832, 480)


def test_keeping_metadata_is_part_of_the_rule_fingerprint() -> None:
    assert rule(keep=True).fingerprint != rule(keep=False).fingerprint


@pytest.mark.parametrize("keep", [False, True])
def test_the_sidecar_keeps_the_source_metadata_either_way(tmp_path: Path, keep: bool) -> None:
    run(comfyui_source(tmp_path, parameters="Steps: 20"), rule(keep=keep), tmp_path / "queue")
    metadata = sidecar(tmp_path / "queue")["source"]["metadata"]
    assert metadata == {"prompt": PROMPT, "workflow": WORKFLOW, "parameters": "Steps: 20"}
    assert json.loads(metadata["prompt"])["6"]["inputs"]["text"] == "a neon sign reading 東京 in the rain"


def test_a_workflow_over_the_text_cap_is_named_in_the_sidecar_and_the_outcome(tmp_path: Path) -> None:
    # Some custom nodes embed whole images in the workflow: it is left out, and the sidecar says which.
    huge = json.dumps({"nodes": [{"id": 1, "widgets_values": ["x" * TEXT_VALUE_LIMIT]}]})
    outcome = run(comfyui_source(tmp_path, workflow=huge), rule(keep=True), tmp_path / "queue")
    source = sidecar(tmp_path / "queue")["source"]
    assert source["metadata"] == {"prompt": PROMPT}
    assert source["metadata_left_out"] == ["workflow"]
    assert outcome.metadata_left_out == ("workflow",)
    assert set(frame_text(tmp_path / "queue")) == {"prompt", "sinkwatch"}


def test_nothing_is_said_left_out_when_all_text_is_kept(tmp_path: Path) -> None:
    outcome = run(comfyui_source(tmp_path), rule(keep=False), tmp_path / "queue")
    assert sidecar(tmp_path / "queue")["source"]["metadata_left_out"] == []
    assert outcome.metadata_left_out == ()


def test_a_source_without_generator_chunks_gets_only_the_sinkwatch_chunk(tmp_path: Path) -> None:
    source = tmp_path / "watch" / "rocket.jpg"
    source.parent.mkdir()
    source.write_bytes(photo_file("rocket").read_bytes())
    run(source, rule(keep=True), tmp_path / "queue")
    assert set(frame_text(tmp_path / "queue")) == {"sinkwatch"}
    assert "prompt" not in sidecar(tmp_path / "queue")["source"]["metadata"]


def edit(source: Path) -> None:
    st = os.stat(source)
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


@pytest.mark.parametrize(
    ("meanwhile", "status", "said"),
    [(edit, "retry", "changed while it was read"), (Path.unlink, "skipped", "vanished")],
    ids=["edited", "deleted"],
)
def test_a_source_changed_while_it_was_decoded_is_not_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, meanwhile: Callable[[Path], None], status: str, said: str
) -> None:
    """Edited, it is tried again; deleted, it is let go (a retry would only find it gone: the old "retrying ...
    vanished" warning promised one that never came)."""
    source = comfyui_source(tmp_path)
    real = runner.decode_source

    def decode_then(*args: Any, **kwargs: Any) -> Any:
        decoded = real(*args, **kwargs)
        meanwhile(source)
        return decoded

    monkeypatch.setattr(runner, "decode_source", decode_then)
    queue = tmp_path / "queue"
    job = Job(source=source, key=source.name, name="frame", rule=rule(keep=False), queue=queue,
              max_bytes=1 << 26, max_pixels=50_000_000)  # fmt: skip
    outcome = process_job(job)
    assert outcome.status == status and said in str(outcome.error)
    assert not (queue / "frame.png").exists()
