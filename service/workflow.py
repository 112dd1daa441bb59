"""API-format ComfyUI workflow templates: load, check, and point them at one frame.

An API-format workflow (what ComfyUI's "Save (API)" / "Export (API)" writes and
``POST /prompt`` takes) maps node ids to ``{"class_type", "inputs", "_meta"}``;
an input is a literal or a link ``[node_id, output_index]``. The UI format
(``nodes`` + ``links``) is what the web editor saves; the server cannot run it.

:func:`prepare` changes exactly two things in a deep copy: the start-image
LoadImage's ``image`` and, where present, the literal ``width``/``height`` of
the image-to-video node. Nothing is randomised (seeds stay as the template has
them), so the same frame, size and template always give the same prompt.
ComfyUI caches by inputs (LoadImage's by the file's SHA-256), so queueing an
identical prompt again runs nothing and returns at once with the earlier
outputs; a frame re-uploaded with new content does run again. To get another
take of the same frame, change the template's seed.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from service.errors import ConfigError

MARKER = "sinkwatch"
LOAD_IMAGE = "LoadImage"
_SIZE_INPUTS = ("width", "height", "length")


class WorkflowError(ConfigError):
    """A workflow template that cannot be used; names the file and the node."""

    reason = "workflow"

    def __init__(self, message: str, *, file: str | Path | None = None, node: str | None = None) -> None:
        super().__init__(f"node {node}: {message}" if node is not None else message, path=file, stage="workflow")
        self.node = node


def load_workflow(path: str | Path) -> dict[str, Any]:
    """Read and check an API-format workflow JSON file, including that it has one start-image node."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise WorkflowError(f"cannot read workflow: {error.strerror or error}", file=path) from error
    except ValueError as error:
        raise WorkflowError(f"not valid JSON: {error}", file=path) from error
    workflow = check_workflow(data, file=path)
    start_image_node(workflow, file=path)
    return workflow


def check_workflow(data: object, *, file: str | Path | None = None) -> dict[str, Any]:
    """Return ``data`` as an API-format workflow or raise :class:`WorkflowError` saying what is wrong."""
    if isinstance(data, Mapping) and "nodes" in data and "links" in data:
        raise WorkflowError(
            "this is a UI-format workflow (it has 'nodes' and 'links'); export it from ComfyUI with "
            "'Save (API)' (menu Workflow > Export (API); older versions: enable dev mode, then 'Save (API Format)')",
            file=file,
        )
    if not isinstance(data, Mapping) or not data:
        raise WorkflowError("expected a JSON object of nodes keyed by node id", file=file)
    for node_id, node in data.items():
        if not isinstance(node, Mapping):
            raise WorkflowError("expected an object with class_type and inputs", file=file, node=node_id)
        if not isinstance(node.get("class_type"), str) or not node["class_type"]:
            raise WorkflowError("missing class_type", file=file, node=node_id)
        if not isinstance(node.get("inputs"), Mapping):
            raise WorkflowError("missing inputs (an object)", file=file, node=node_id)
        for name, value in node["inputs"].items():
            if _is_link(value) and str(value[0]) not in data:
                raise WorkflowError(f"input {name!r} links to missing node {value[0]!r}", file=file, node=node_id)
    return {str(node_id): node for node_id, node in data.items()}


def start_image_node(workflow: Mapping[str, Any], *, file: str | Path | None = None) -> str:
    """Id of the node that gets the frame.

    That is the node with a literal ``image`` input whose title contains
    "sinkwatch" (any case), else the only LoadImage; none, or several without a
    marker, is an error.
    """
    # A marked node must take an image name; other nodes may mention sinkwatch in a title freely.
    marked = [
        node_id
        for node_id, node in workflow.items()
        if MARKER in _title(node).lower() and isinstance(node["inputs"].get("image"), str)
    ]
    if len(marked) > 1:
        raise WorkflowError(f"several image loaders have {MARKER!r} in their title: {', '.join(marked)}", file=file)
    if marked:
        return marked[0]
    loaders = [node_id for node_id, node in workflow.items() if node["class_type"] == LOAD_IMAGE]
    if not loaders:
        raise WorkflowError(f"no {LOAD_IMAGE} node for the start frame", file=file)
    if len(loaders) > 1:
        raise WorkflowError(
            f"{len(loaders)} {LOAD_IMAGE} nodes ({', '.join(loaders)}); put {MARKER!r} in the title of the "
            "one that takes the start frame",
            file=file,
        )
    return loaders[0]


def prepare(workflow: Mapping[str, Any], *, image: str, width: int, height: int) -> dict[str, Any]:
    """A deep copy of ``workflow`` with the start image set to ``image`` and the video size to ``width x height``.

    ``image`` is what LoadImage takes: a name in ComfyUI's ``input/`` or
    ``subfolder/name``. Size inputs are set only where they are literal numbers
    (a linked width is left to its source node). An image-to-video node whose
    step the size does not fit (16; 32 for the Wan 2.2 5B latent node) is an
    error rather than a silent crop.
    """
    if not image:
        raise ValueError("image must name a file in ComfyUI's input folder")
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    prepared = check_workflow(copy.deepcopy(dict(workflow)))
    prepared[start_image_node(prepared)]["inputs"]["image"] = image
    for node_id, node in prepared.items():
        inputs = node["inputs"]
        if not _is_video_node(node):
            continue
        if not all(_is_number(inputs.get(name)) for name in ("width", "height")):
            continue
        step = _step(node["class_type"])
        if width % step or height % step:
            raise WorkflowError(
                f"{node['class_type']} needs a size in steps of {step}, the rule gives {width}x{height}", node=node_id
            )
        inputs["width"], inputs["height"] = width, height
    return prepared


def _is_video_node(node: Mapping[str, Any]) -> bool:
    return "ImageToVideo" in node["class_type"] or all(name in node["inputs"] for name in _SIZE_INPUTS)


def _step(class_type: str) -> int:
    # WanImageToVideo & co. take steps of 16; the Wan 2.2 5B latent node (48-channel VAE) 32.
    if "ImageToVideo" not in class_type:
        return 1
    return 32 if class_type.startswith("Wan22") else 16


def _title(node: Mapping[str, Any]) -> str:
    meta = node.get("_meta")
    title = meta.get("title") if isinstance(meta, Mapping) else None
    return title if isinstance(title, str) else ""


def _is_link(value: object) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int) and not isinstance(value[1], bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
