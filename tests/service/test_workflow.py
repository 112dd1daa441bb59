"""Workflow templates: loading, checking, choosing the start-image node, preparing a prompt."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from service.errors import ConfigError
from service.workflow import WorkflowError, check_workflow, load_workflow, prepare, start_image_node

TEMPLATES = Path(__file__).resolve().parents[2] / "deploy" / "comfyui"
WAN = TEMPLATES / "wan22-i2v-api.json"
SMOKE = TEMPLATES / "loadimage-save-api.json"

# From ComfyUI's node definitions (nodes.py, comfy_extras/nodes_wan.py, nodes_video.py,
# nodes_model_advanced.py): class -> (required inputs, optional inputs, output types).
NODE_SPECS: dict[str, tuple[set[str], set[str], list[str]]] = {
    "UNETLoader": ({"unet_name", "weight_dtype"}, set(), ["MODEL"]),
    "ModelSamplingSD3": ({"model", "shift"}, set(), ["MODEL"]),
    "CLIPLoader": ({"clip_name", "type"}, {"device"}, ["CLIP"]),
    "VAELoader": ({"vae_name"}, set(), ["VAE"]),
    "LoadImage": ({"image"}, {"upload"}, ["IMAGE", "MASK"]),
    "CLIPTextEncode": ({"text", "clip"}, set(), ["CONDITIONING"]),
    "WanImageToVideo": (
        {"positive", "negative", "vae", "width", "height", "length", "batch_size"},
        {"clip_vision_output", "start_image"},
        ["CONDITIONING", "CONDITIONING", "LATENT"],
    ),
    "KSamplerAdvanced": (
        {
            "model",
            "add_noise",
            "noise_seed",
            "steps",
            "cfg",
            "sampler_name",
            "scheduler",
            "positive",
            "negative",
            "latent_image",
            "start_at_step",
            "end_at_step",
            "return_with_leftover_noise",
        },
        set(),
        ["LATENT"],
    ),
    "VAEDecode": ({"samples", "vae"}, set(), ["IMAGE"]),
    "CreateVideo": ({"images", "fps"}, {"audio"}, ["VIDEO"]),
    "SaveVideo": ({"video", "filename_prefix", "format", "codec"}, set(), []),
    "SaveImage": ({"images", "filename_prefix"}, set(), []),
}
# Linked inputs -> the type they take.
INPUT_TYPES = {
    "model": "MODEL", "clip": "CLIP", "vae": "VAE", "positive": "CONDITIONING", "negative": "CONDITIONING",
    "start_image": "IMAGE", "latent_image": "LATENT", "samples": "LATENT", "images": "IMAGE", "video": "VIDEO",
}  # fmt: skip


def loader(title: str = "Load Image", image: str = "example.png") -> dict[str, Any]:
    return {"class_type": "LoadImage", "inputs": {"image": image}, "_meta": {"title": title}}


def save(source: str) -> dict[str, Any]:
    return {"class_type": "SaveImage", "inputs": {"images": [source, 0], "filename_prefix": "x"}}


def write_json(tmp_path: Path, data: object, name: str = "workflow.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.mark.parametrize("template", [WAN, SMOKE], ids=lambda p: p.name)
def test_shipped_templates_use_comfyui_node_and_input_names(template: Path) -> None:
    workflow = load_workflow(template)
    for node_id, node in workflow.items():
        required, optional, _outputs = NODE_SPECS[node["class_type"]]
        names = set(node["inputs"])
        assert required <= names, f"node {node_id} misses {required - names}"
        assert names <= required | optional, f"node {node_id} has unknown inputs {names - required - optional}"
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                source = workflow[value[0]]
                produced = NODE_SPECS[source["class_type"]][2][value[1]]
                assert produced == INPUT_TYPES[name], f"node {node_id}.{name} gets {produced}"


def test_wan_template_is_the_wan22_i2v_graph() -> None:
    workflow = load_workflow(WAN)
    classes = sorted(node["class_type"] for node in workflow.values())
    assert classes.count("UNETLoader") == 2 and classes.count("KSamplerAdvanced") == 2
    unets = {node["inputs"]["unet_name"] for node in workflow.values() if node["class_type"] == "UNETLoader"}
    assert unets == {
        "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors",
        "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors",
    }
    video = next(node for node in workflow.values() if node["class_type"] == "WanImageToVideo")
    assert (video["inputs"]["width"], video["inputs"]["height"], video["inputs"]["length"]) == (832, 480, 81)


def test_prepare_points_the_marked_loader_at_the_frame_and_sets_the_size() -> None:
    template = load_workflow(WAN)
    node_id = start_image_node(template)
    assert template[node_id]["_meta"]["title"] == "sinkwatch start frame"
    prepared = prepare(template, image="sinkwatch/astronaut_0001.png", width=480, height=832)
    assert prepared[node_id]["inputs"]["image"] == "sinkwatch/astronaut_0001.png"
    video = next(node for node in prepared.values() if node["class_type"] == "WanImageToVideo")
    assert (video["inputs"]["width"], video["inputs"]["height"], video["inputs"]["length"]) == (480, 832, 81)
    changed = {
        (nid, name)
        for nid, node in prepared.items()
        for name, value in node["inputs"].items()
        if template[nid]["inputs"][name] != value
    }
    assert changed == {(node_id, "image"), ("10", "width"), ("10", "height")}


def test_prepare_leaves_the_template_alone_and_is_deterministic() -> None:
    template = load_workflow(WAN)
    pristine = copy.deepcopy(template)
    first = prepare(template, image="a.png", width=1280, height=720)
    second = prepare(template, image="a.png", width=1280, height=720)
    assert template == pristine
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)


def test_the_smoke_template_uses_its_only_loadimage() -> None:
    template = load_workflow(SMOKE)
    assert "sinkwatch" not in template["1"]["_meta"]["title"].lower()
    prepared = prepare(template, image="frame.png", width=832, height=480)
    assert prepared["1"]["inputs"]["image"] == "frame.png"
    assert prepared["2"] == template["2"]


def test_the_marker_picks_one_of_several_loaders_in_any_case() -> None:
    workflow = {"1": loader("Reference"), "2": loader("SinkWatch frame"), "3": save("1"), "4": save("2")}
    assert start_image_node(workflow) == "2"
    assert prepare(workflow, image="f.png", width=16, height=16)["1"]["inputs"]["image"] == "example.png"


def test_a_marker_on_a_node_without_an_image_input_does_not_count() -> None:
    workflow = {"1": loader(), "2": save("1")}
    workflow["2"]["_meta"] = {"title": "sinkwatch result"}
    assert start_image_node(workflow) == "1"


@pytest.mark.parametrize(
    ("workflow", "match"),
    [
        ({"1": loader(), "2": loader(), "3": save("1")}, "put 'sinkwatch' in the title"),
        ({"1": loader("sinkwatch a"), "2": loader("sinkwatch b"), "3": save("1")}, "several image loaders"),
        ({"1": {"class_type": "EmptyImage", "inputs": {"width": 8}}, "2": save("1")}, "no LoadImage"),
    ],
    ids=["ambiguous", "two-marked", "none"],
)
def test_no_single_start_image_node_is_an_error(workflow: dict[str, Any], match: str) -> None:
    with pytest.raises(WorkflowError, match=match):
        prepare(workflow, image="f.png", width=832, height=480)


def test_an_ambiguous_template_fails_at_load_time(tmp_path: Path) -> None:
    path = write_json(tmp_path, {"1": loader(), "2": loader(), "3": save("1")})
    with pytest.raises(WorkflowError) as caught:
        load_workflow(path)
    assert caught.value.path == str(path)


def test_a_ui_format_workflow_says_export_with_save_api(tmp_path: Path) -> None:
    ui = {"last_node_id": 2, "nodes": [{"id": 1, "type": "LoadImage", "widgets_values": ["x.png"]}], "links": []}
    with pytest.raises(WorkflowError, match=r"UI-format.*'Save \(API\)'") as caught:
        load_workflow(write_json(tmp_path, ui))
    assert isinstance(caught.value, ConfigError)
    assert caught.value.reason == "workflow"


@pytest.mark.parametrize(
    ("data", "node", "match"),
    [
        ({"1": {"inputs": {}}}, "1", "missing class_type"),
        ({"1": {"class_type": "LoadImage", "inputs": ["x.png"]}}, "1", "missing inputs"),
        ({"1": {"class_type": "LoadImage"}}, "1", "missing inputs"),
        ({"1": "LoadImage"}, "1", "expected an object"),
        ({"1": loader(), "2": save("9")}, "2", "links to missing node '9'"),
        ({}, None, "expected a JSON object"),
        ([loader()], None, "expected a JSON object"),
    ],
)
def test_malformed_api_workflows_name_the_node(data: object, node: str | None, match: str) -> None:
    with pytest.raises(WorkflowError, match=match) as caught:
        check_workflow(data, file="t.json")
    assert caught.value.node == node
    assert caught.value.path == "t.json"


def test_unreadable_and_invalid_json_files(tmp_path: Path) -> None:
    with pytest.raises(WorkflowError, match="cannot read"):
        load_workflow(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(WorkflowError, match="not valid JSON"):
        load_workflow(broken)


def test_a_linked_size_is_left_to_its_source() -> None:
    workflow = load_workflow(WAN)
    workflow["20"] = {"class_type": "PrimitiveInt", "inputs": {"value": 640}}
    workflow["10"]["inputs"]["width"] = ["20", 0]
    prepared = prepare(workflow, image="f.png", width=832, height=480)
    assert prepared["10"]["inputs"]["width"] == ["20", 0]
    assert prepared["10"]["inputs"]["height"] == 480


def test_the_wan22_5b_latent_node_needs_steps_of_32() -> None:
    workflow = {
        "1": loader("sinkwatch"),
        "2": {
            "class_type": "Wan22ImageToVideoLatent",
            "inputs": {"vae": ["3", 0], "width": 1280, "height": 704, "length": 121, "batch_size": 1,
                       "start_image": ["1", 0]},
        },
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "wan2.2_vae.safetensors"}},
    }  # fmt: skip
    prepared = prepare(workflow, image="f.png", width=704, height=1280)
    assert (prepared["2"]["inputs"]["width"], prepared["2"]["inputs"]["height"]) == (704, 1280)
    with pytest.raises(WorkflowError, match="steps of 32") as caught:
        prepare(workflow, image="f.png", width=1280, height=720)
    assert caught.value.node == "2"
    with pytest.raises(WorkflowError, match="steps of 16"):
        prepare(load_workflow(WAN), image="f.png", width=840, height=480)


def test_any_node_with_width_height_length_gets_the_size() -> None:
    workflow = {
        "1": loader(),
        "2": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 848, "height": 480, "length": 25,
                                                                    "batch_size": 1}},
        "3": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "width": 512, "height": 512,
                                                     "upscale_method": "area", "crop": "center"}},
    }  # fmt: skip
    prepared = prepare(workflow, image="f.png", width=832, height=480)
    assert (prepared["2"]["inputs"]["width"], prepared["2"]["inputs"]["height"]) == (832, 480)
    assert (prepared["3"]["inputs"]["width"], prepared["3"]["inputs"]["height"]) == (512, 512)


@pytest.mark.parametrize(("image", "width", "height"), [("", 832, 480), ("f.png", 0, 480), ("f.png", 832, -16)])
def test_prepare_checks_its_arguments(image: str, width: int, height: int) -> None:
    with pytest.raises(ValueError):
        prepare(load_workflow(SMOKE), image=image, width=width, height=height)
