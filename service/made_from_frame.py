"""Images ComfyUI made from one of sinkwatch's own frames: what a video job saves, not a new start frame.

Watching ComfyUI's ``output/`` (where the image generator saves) also sees
what the video jobs fed from the queue save there: Video Helper Suite's Video
Combine writes each video's first frame as a PNG beside it, SaveAnimatedWEBP
and SaveAnimatedPNG the video itself as an animated image. Taken for new
images, each would become a start frame, and with ``--comfyui-workflow`` queue
a video of itself, and so on without end.

ComfyUI embeds the prompt that made an image (the API graph: a PNG's
``prompt`` text or ``comf`` chunk, a WebP's EXIF, see
:mod:`service.webp_text`); Video Combine's animated WebP and GIF carry none,
but the PNG it writes first under the same name does. An image is made from a
frame when the part of its prompt that fed the node that saved it (or the
whole prompt, when no saver's ``filename_prefix`` names the file) loads one
of sinkwatch's frames, by any name ComfyUI knows it by (see
:class:`FrameRefs`).
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.errors import InputError
from service.file_hash import open_nonblocking
from service.ownership import read_json
from service.png_chunks import png_text, walk_chunks
from service.publish import Publisher

# ComfyUI's annotated names: "x.png [input]" reads input/, the others read output/ or temp/.
_ANNOTATION = re.compile(r" ?\[(input|output|temp)\]$")
# ComfyUI's name for an upload whose name another file had ("x (1).png"), and sinkwatch's for one version of a
# frame uploaded with a workflow ("x-<8 hex of its sha256>.png", service.upload_sender).
_RENAMED = re.compile(r"(.+) \([0-9]+\)")
_VERSION = re.compile(r"(.+)-[0-9a-f]{8}")
# Names of PNGs in one prompt looked up at most: a prompt of hundreds of thousands of them must not hold a worker.
_MOST_NAMES = 256
# The PNG written beside a video is a few MB at most; a larger file of that name is something else.
_SIBLING_BYTES = 64 << 20


@dataclass(frozen=True)
class FrameRefs:
    """How ComfyUI names sinkwatch's frames.

    top_level : the queue is ComfyUI's ``input/``: a frame is ``<name>.png``.
    upload_folder : the subfolder of ComfyUI's ``input/`` the frames are uploaded into ("" at its top
        level), None when nothing is uploaded. Its uploads are ``<name>.png`` or, one per version with a
        workflow, ``<name>-<8 hex>.png``; at the top level ComfyUI renames a name another file has
        (``<name> (1).png``), which only the sidecar's record of the upload tells.
    """

    top_level: bool = True
    upload_folder: str | None = None


# The embedded default: the queue is ComfyUI's input/, nothing is uploaded.
LOCAL = FrameRefs()


def loaded_frame(text: Mapping[str, str], source: Path, publisher: Publisher, refs: FrameRefs) -> str | None:
    """The name of the sinkwatch frame that the ComfyUI prompt in `text` (the text of image `source`) loads."""
    prompt = text.get("prompt")
    if prompt is None or ".png" not in prompt:  # every frame is a PNG: most prompts need no parsing
        return None
    try:
        graph = json.loads(prompt)
    except (ValueError, RecursionError):
        return None
    if not isinstance(graph, dict):
        return None
    sidecars: dict[str, dict[str, Any] | None] = {}
    for value in list(dict.fromkeys(_png_names(_feeding(graph, source))))[:_MOST_NAMES]:
        if (name := _frame_named(value, publisher, refs, sidecars)) is not None:
            return name
    return None


def sibling_text(source: Path) -> dict[str, str]:
    """The text of the PNG named like `source` beside it (Video Combine's first frame of the video `source`)."""
    sibling = source.with_suffix(".png")
    if sibling == source:
        return {}
    try:
        with open_nonblocking(sibling) as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                return {}
            data = file.read(_SIBLING_BYTES + 1)
        if len(data) > _SIBLING_BYTES or data[:8] != b"\x89PNG\r\n\x1a\n":
            return {}
        return png_text(memoryview(data), walk_chunks(data, sibling).text)[0]
    except (OSError, InputError):
        return {}


def _feeding(graph: dict[Any, Any], source: Path) -> list[Any]:
    """The nodes upstream of the savers whose ``filename_prefix`` names `source` (they and what feeds them),
    in the prompt's order; every node when none does, or when a prefix is not plain text (a ``%date%``
    pattern, a link): a prompt may hold branches that saved other files."""
    nodes = {key: node for key, node in graph.items() if isinstance(node, dict)}
    nodes = {key: node for key, node in nodes.items() if isinstance(node.get("inputs"), dict)}
    prefixes = {
        key: node["inputs"]["filename_prefix"] for key, node in nodes.items() if "filename_prefix" in node["inputs"]
    }
    if any(not isinstance(prefix, str) or "%" in prefix for prefix in prefixes.values()):
        return list(nodes.values())
    todo = [key for key, prefix in prefixes.items() if _saved(source, prefix)]
    if not todo:
        return list(nodes.values())
    seen: set[Any] = set()
    while todo:
        key = todo.pop()
        if key in seen or key not in nodes:
            continue
        seen.add(key)
        # A link is [node id, output index].
        links = [value for value in nodes[key]["inputs"].values() if isinstance(value, list) and len(value) == 2]
        todo += [link[0] for link in links if isinstance(link[0], str | int)]
    return [node for key, node in nodes.items() if key in seen]


def _saved(source: Path, prefix: str) -> bool:
    """Whether a saver with `prefix` writes files named like `source`: ``<name>_<counter>...`` for a prefix
    ``[folder/]<name>``, in a folder of that name when it has one."""
    folders = [part for part in prefix.replace("\\", "/").split("/") if part]
    if not folders:
        return False
    name = folders.pop()
    if folders and list(source.parent.parts[-len(folders) :]) != folders:
        return False
    return source.name.startswith(name + "_")


def _png_names(nodes: list[Any]) -> Iterator[str]:
    for node in nodes:
        yield from (value for value in node["inputs"].values() if isinstance(value, str) and ".png" in value)


def _frame_named(
    value: str, publisher: Publisher, refs: FrameRefs, sidecars: dict[str, dict[str, Any] | None]
) -> str | None:
    annotated = _ANNOTATION.search(value)
    if annotated is not None and annotated[1] != "input":
        return None
    path = (value[: annotated.start()] if annotated is not None else value).replace("\\", "/")
    folder, _, base = path.strip("/").rpartition("/")
    if not base.endswith(".png"):
        return None
    stem = base[: -len(".png")]
    renamed = _RENAMED.fullmatch(stem)
    unrenamed = renamed[1] if renamed is not None else stem
    version = _VERSION.fullmatch(unrenamed)
    if refs.top_level and not folder and _published(publisher, stem):
        return stem  # Load Image reads the frame itself
    if refs.upload_folder is not None and folder == refs.upload_folder.strip("/"):
        if version is not None and not renamed and _published(publisher, version[1]):
            return version[1]  # sinkwatch's name for a version of that frame: no file of anyone else's
        if folder and not renamed and _published(publisher, stem):
            return stem  # sinkwatch's own subfolder, where its uploads keep their names
    # Anything else ComfyUI named an upload (a rename at the top level): as the sidecar records it.
    for name in dict.fromkeys((stem, unrenamed, version[1] if version is not None else stem)):
        if name not in sidecars:
            sidecars[name] = read_json(publisher.sidecar_path(name)) if _published(publisher, name) else None
        if _uploaded_as(sidecars[name], path):
            return name
    return None


def _published(publisher: Publisher, name: str) -> bool:
    """Whether `name` is an output of sinkwatch's in the queue: its frame, and its sidecar beside it."""
    try:
        return publisher.frame_path(name).is_file() and publisher.sidecar_path(name).is_file()
    except (ValueError, OSError):  # not a name sinkwatch gives, or the queue is out of reach
        return False


def _uploaded_as(sidecar: dict[str, Any] | None, path: str) -> bool:
    note = sidecar.get("comfyui") if sidecar is not None else None
    return isinstance(note, dict) and note.get("upload") == path
