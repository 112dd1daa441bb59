"""Whose file a frame in the queue is: sinkwatch's, which it may replace, or someone else's, which it never touches.

The queue is ComfyUI's ``input/``: the user may edit a frame in place, put
their own image under its name, or leave a link there. A frame is sinkwatch's
when its bytes are ones sinkwatch wrote under that name for that source: the
hash the ledger recorded at publication, or the hash its sidecar names. A
sidecar also names the frame it was about to replace, so that a publication
cut short between the sidecar and the frame still knows the old frame as its
own.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path
from typing import Any

from service.errors import PublishError
from service.file_hash import sha256_file
from service.publish import Publisher, publish_error


class Foreign(Exception):
    """The file at a frame's name is not one sinkwatch wrote there."""


def own_frame(publisher: Publisher, name: str, key: str, *, recorded: str | None, source: Path | None = None) -> str:
    """The hash of sinkwatch's frame `name` of source `key` ("" when nothing is there); raises Foreign otherwise,
    and PublishError when the queue cannot be looked into.

    `recorded`: the ledger's hash of the frame last published for the source; `source`: its path, which a
    sidecar written under another key (an absolute one, by ``sinkwatch process``) also names.
    """
    frame = publisher.frame_path(name)
    try:
        mode = os.lstat(frame).st_mode
    except FileNotFoundError:
        return ""
    except OSError as exc:  # the queue itself is out of reach (a file in the way, permissions): try again later
        raise publish_error("cannot look at the frame", frame, exc) from exc
    # sinkwatch writes regular files only: a link (even a dangling one), a folder or a FIFO is someone's.
    if not stat.S_ISREG(mode):
        raise Foreign(f"{frame} is not a regular file")
    try:
        found = sha256_file(frame)
    except OSError as exc:
        raise Foreign(f"cannot read {frame}: {exc.strerror or exc}") from exc
    if found is not None and (found == recorded or found in _frames_named(own_sidecar(publisher, name, key, source))):
        return found
    raise Foreign(f"{frame} is not the frame sinkwatch published there")


def is_own_or_free(publisher: Publisher, name: str, key: str, source: Path | None = None) -> bool:
    """Whether source `key` (the file `source`) may take output `name`: nothing is there, or its own frame is."""
    try:
        own_frame(publisher, name, key, recorded=None, source=source)
    except (Foreign, PublishError):
        return False
    return True


def is_own(publisher: Publisher, name: str, key: str, source: Path | None = None) -> bool:
    """Whether output `name` is there and is source `key`'s own frame (the file `source`'s)."""
    try:
        return own_frame(publisher, name, key, recorded=None, source=source) != ""
    except (Foreign, PublishError):
        return False


def own_sidecar(publisher: Publisher, name: str, key: str, source: Path | None = None) -> dict[str, Any] | None:
    """The sidecar of output `name` if it exists and was written for source `key` (or the file `source`).

    ``sinkwatch process`` keys a file outside the watch folder by its real path and records the
    path as it was given (relative, say); the daemon records the absolute path, which is `source` when
    both lead to one file (a `process` on a ledger of its own, given the daemon's file): any names `source`.
    """
    sidecar = read_json(publisher.sidecar_path(name))
    try:
        if sidecar is None:
            return None
        written_for = sidecar["source"]
        if written_for["key"] == key:
            return sidecar
        if source is not None:
            path, real = written_for["path"], os.path.realpath(source)
            same_file = os.path.isabs(path) and os.path.realpath(path) == real
            if path == str(source) or written_for["key"] == real or same_file:
                return sidecar
    except (KeyError, TypeError):
        pass
    return None


def describes(sidecar: dict[str, Any], source: Path, publisher: Publisher, name: str) -> bool:
    """Whether `sidecar` describes the current content of `source`, and output `name` on disk is whole:
    its frame the regular file the sidecar names by hash and size, its heatmap there.

    What settles a source from its outputs alone: after a crash, or when the ledger has no row for it.
    The size is what an upload owed to ComfyUI is queued with, so it is the frame's own.
    """
    frame = publisher.frame_path(name)
    try:
        rule, output = sidecar["rule"], sidecar["output"]
        return bool(
            all(type(rule[field]) is str for field in ("name", "fingerprint"))
            and _regular(frame)
            and _regular(publisher.heatmap_path(name))
            and (output["width"], output["height"]) == _png_size(frame)
            and sidecar["source"]["sha256"] == sha256_file(source)
            and output["frame_sha256"] == sha256_file(frame)
        )
    except (KeyError, TypeError, OSError):
        return False


def _png_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from a PNG's header: sinkwatch writes IHDR first, as PNG requires."""
    with open(path, "rb") as file:
        head = file.read(24)
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def _regular(path: Path) -> bool:
    """A regular file, not a link to one: sinkwatch writes nothing else."""
    return stat.S_ISREG(os.lstat(path).st_mode)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in file `path`; None if it cannot be read or holds something else."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _frames_named(sidecar: dict[str, Any] | None) -> set[str]:
    if sidecar is None:
        return set()
    output = sidecar.get("output")
    if not isinstance(output, dict):
        return set()
    return {value for key in ("frame_sha256", "replaces_frame_sha256") if isinstance(value := output.get(key), str)}
