"""The errors of the ComfyUI client, and how a 4xx answer becomes a :class:`ComfyRejected`.

Failures split in two: :class:`ComfyUnavailable` (refused, timed out, 5xx,
not a ComfyUI answer: transient, try again later) and :class:`ComfyRejected`
(a 4xx: the request itself is wrong, sending it again will not help).
:class:`ComfyPending` is neither: the prompt was accepted but has not finished.
Kept apart from :mod:`service.comfyui` so that the client reads as the
conversation with the server, and reading ComfyUI's error bodies (``error``,
``node_errors``) stays in one place.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from service.errors import SinkwatchError


class ComfyUnavailable(SinkwatchError):
    """ComfyUI cannot be reached or failed on its side: try again later."""

    reason = "comfyui_down"
    transient = True

    def __init__(self, message: str, *, url: str, status: int | None = None) -> None:
        super().__init__(message, stage="comfyui")
        self.url = url
        self.status = status

    def as_record(self) -> dict[str, object]:
        return {**super().as_record(), "url": self.url, "status": self.status}


class ComfyRejected(SinkwatchError):
    """ComfyUI refused the request (4xx), with its ``error`` and ``node_errors`` as fields."""

    reason = "comfyui_rejected"

    def __init__(
        self,
        message: str,
        *,
        url: str,
        status: int,
        error_type: str | None = None,
        details: str | None = None,
        node_errors: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message, stage="comfyui")
        self.url = url
        self.status = status
        self.error_type = error_type
        self.details = details
        self.node_errors: dict[str, Any] = dict(node_errors or {})

    def node_messages(self) -> list[str]:
        """One line per node error, e.g. ``node 10 (LoadImage): image - Invalid image file: x.png``."""
        lines = []
        for node_id, entry in sorted(self.node_errors.items()):
            entry = entry if isinstance(entry, Mapping) else {}
            for error in entry.get("errors") or ():
                if isinstance(error, Mapping):
                    text = error.get("details") or error.get("message") or error.get("type")
                    lines.append(f"node {node_id} ({entry.get('class_type', '?')}): {text}")
        return lines

    def as_record(self) -> dict[str, object]:
        return {
            **super().as_record(),
            "url": self.url,
            "status": self.status,
            "error_type": self.error_type,
            "details": self.details,
            "node_errors": self.node_messages(),
        }


class ComfyPending(SinkwatchError):
    """A queued prompt had not finished when the wait ran out (still queued or running)."""

    reason = "comfyui_pending"
    transient = True


def rejection(method: str, route: str, url: str, status: int, payload: bytes) -> ComfyRejected:
    """The :class:`ComfyRejected` for a 4xx answer.

    ComfyUI's ``error`` and ``node_errors`` become its fields; a body that is not
    JSON (a bare 400, a proxy page) is kept as ``details``.
    """
    try:
        answer = json.loads(payload) if payload else None
    except ValueError:
        answer = None
    error_type = details = None
    comfy_message = ""
    node_errors: Mapping[str, Any] = {}
    if isinstance(answer, Mapping):
        error = answer.get("error")
        if isinstance(error, Mapping):
            error_type = error.get("type")
            comfy_message = str(error.get("message") or "")
            details = error.get("details")
        elif isinstance(error, str):
            comfy_message = error
        if isinstance(answer.get("node_errors"), Mapping):
            node_errors = answer["node_errors"]
    elif payload:
        details = payload[:500].decode("utf-8", "replace")
    message = f"ComfyUI rejected {method} {route} ({status})" + (f": {comfy_message}" if comfy_message else "")
    return ComfyRejected(
        message,
        url=url,
        status=status,
        error_type=str(error_type) if error_type is not None else None,
        details=str(details) if details else None,
        node_errors=node_errors,
    )
