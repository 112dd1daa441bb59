"""The ``comfyui`` entry of a frame's sidecar: what was uploaded, and the prompt queued on it.

The sidecar (``QUEUE/matrix/<name>.json``) is the publisher's; the uploader
adds one key to it after the fact. It only does so while the sidecar still
describes the frame that was sent (same ``frame_sha256``): a frame republished
meanwhile is noted by its own upload. The read-modify-write is not atomic
against a worker process publishing that name at the same moment, so the
caller makes sure none does (see ``busy`` in :mod:`service.uploader`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from loguru import logger

from service.errors import PublishError
from service.metrics import Metrics
from service.publish import Publisher


def note_upload(
    publisher: Publisher, metrics: Metrics, name: str, *, frame_sha256: str | None, note: Mapping[str, object]
) -> bool:
    """Add ``{"comfyui": note}`` to the sidecar of frame `name` if it describes `frame_sha256`; True if written."""
    path = publisher.sidecar_path(name)
    try:
        sidecar = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        logger.bind(frame=name).warning("cannot read the sidecar of {} to note the upload: {}", name, exc)
        return False
    output = sidecar.get("output") if isinstance(sidecar, dict) else None
    if not isinstance(output, dict) or output.get("frame_sha256") != frame_sha256:
        logger.bind(frame=name).debug("sidecar of {} describes a newer frame; not noting the old upload", name)
        return False
    sidecar["comfyui"] = dict(note)
    try:
        publisher.write_sidecar(name, sidecar)
    except PublishError as exc:
        metrics.record_publish_error(exc)
        logger.bind(frame=name).warning("cannot note the upload in the sidecar of {}: {}", name, exc)
        return False
    return True
