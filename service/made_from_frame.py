"""Images ComfyUI made from one of sinkwatch's own frames: what a video job saves, not a new start frame.

Watching ComfyUI's ``output/`` (where the image generator saves) also sees
what the video jobs fed from the queue save there: Video Helper Suite's Video
Combine writes each video's first frame as a PNG beside it, SaveAnimatedWEBP
and SaveAnimatedPNG the video itself as an animated image. Taken for new
images, each would become a start frame, and with ``--comfyui-workflow`` queue
a video of itself, and so on without end.

ComfyUI embeds the prompt that made an image (the API graph: a PNG's
``prompt`` text, a WebP's EXIF, see :mod:`service.webp_text`). An image whose
prompt loads one of sinkwatch's frames is made from it: an input naming a
frame in the queue folder (which is ComfyUI's ``input/``, so a Load Image
there reads the frame itself), or naming the upload of one to a remote
ComfyUI, as its sidecar records it (``comfyui.upload``) or as sinkwatch names
the versions it uploads (``<frame>-<8 hex of its sha256>.png``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from service.ownership import read_json
from service.publish import Publisher

# ComfyUI's annotated names: "x.png [input]" reads input/, the others read output/ or temp/.
_ANNOTATION = re.compile(r" ?\[(input|output|temp)\]$")
# sinkwatch's name for one version of a frame in ComfyUI (service.upload_sender), and ComfyUI's for an upload
# whose name was taken by another file: "x (1).png".
_VERSION = re.compile(r"(.+)-([0-9a-f]{8})")
_RENAMED = re.compile(r"(.+) \([0-9]+\)")


def loaded_frame(text: Mapping[str, str], publisher: Publisher) -> str | None:
    """The name of the sinkwatch frame that the ComfyUI prompt in `text` (an image's text) loads, if any."""
    prompt = text.get("prompt")
    if prompt is None or ".png" not in prompt:  # every frame is a PNG: most prompts need no parsing
        return None
    try:
        graph = json.loads(prompt)
    except (ValueError, RecursionError):
        return None
    for value in _string_inputs(graph):
        if (name := _frame_named(value, publisher)) is not None:
            return name
    return None


def _string_inputs(graph: Any) -> list[str]:
    """The string inputs of the nodes of an API-format prompt (``{id: {"inputs": {...}}}``) that name a PNG."""
    if not isinstance(graph, dict):
        return []
    values = []
    for node in graph.values():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if isinstance(inputs, dict):
            values += [value for value in inputs.values() if isinstance(value, str) and ".png" in value]
    return values


def _frame_named(value: str, publisher: Publisher) -> str | None:
    annotated = _ANNOTATION.search(value)
    if annotated is not None and annotated[1] != "input":
        return None
    path = value[: annotated.start()] if annotated is not None else value
    folder, _, base = path.replace("\\", "/").rpartition("/")
    if not base.endswith(".png"):
        return None
    stem = base[: -len(".png")]
    if not folder and _published(publisher, stem):
        return stem
    # An upload to a remote ComfyUI: named after the frame, as a version of it, or renamed by ComfyUI.
    candidates: list[tuple[str, str | None]] = [(stem, None)]
    if (version := _VERSION.fullmatch(stem)) is not None:
        candidates.append((version[1], version[2]))
    if (renamed := _RENAMED.fullmatch(stem)) is not None:
        candidates.append((renamed[1], None))
    for name, sha256_start in candidates:
        if _published(publisher, name) and _uploaded_as(read_json(publisher.sidecar_path(name)), path, sha256_start):
            return name
    return None


def _published(publisher: Publisher, name: str) -> bool:
    """Whether `name` is an output of sinkwatch's in the queue: its frame, and its sidecar beside it."""
    try:
        return publisher.frame_path(name).is_file() and publisher.sidecar_path(name).is_file()
    except (ValueError, OSError):  # not a name sinkwatch gives, or the queue is out of reach
        return False


def _uploaded_as(sidecar: dict[str, Any] | None, path: str, sha256_start: str | None) -> bool:
    """Whether the frame of `sidecar` went to ComfyUI as `path`, or is the version whose hash starts so."""
    note = sidecar.get("comfyui") if sidecar else None
    output = sidecar.get("output") if sidecar else None
    if isinstance(note, dict) and note.get("upload") == path:
        return True
    frame_sha256 = output.get("frame_sha256") if isinstance(output, dict) else None
    return sha256_start is not None and isinstance(frame_sha256, str) and frame_sha256.startswith(sha256_start)
