"""The whole sinkwatch error tree, on one screen.

Every error carries structured fields (``path``, ``rule``, ``stage``,
``reason``) so that the daemon, the ledger, the reject records and the metrics
never parse a message. ``reason`` is a short, fixed slug (a metric label
value); ``transient`` says whether trying again later can help. Only a
:class:`ConfigError` may stop the daemon.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Every reason a source can be rejected for; metrics pre-initialise these.
REJECT_REASONS = (
    "empty",
    "too_large",
    "bomb",
    "not_image",
    "unsupported",
    "corrupt",
    "incomplete",
    "crashed",
)


class SinkwatchError(Exception):
    reason = "error"
    transient = False

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        rule: str | None = None,
        stage: str | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.path = str(path) if path is not None else None
        self.rule = rule
        self.stage = stage
        if reason is not None:
            self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message

    def as_record(self) -> dict[str, object]:
        """The fields a reject record, a sidecar or a JSON log line carries."""
        return {
            "error": type(self).__name__,
            "reason": self.reason,
            "message": self.message,
            "path": self.path,
            "rule": self.rule,
            "stage": self.stage,
            "transient": self.transient,
        }


class ConfigError(SinkwatchError):
    """Settings or folders that make starting impossible."""

    reason = "config"


class FolderBusy(ConfigError):
    """Another sinkwatch holds the state or queue folder. It stops this one like any ConfigError, but it
    may pass (a `sinkwatch process` ends), so the command exits 75 and a service manager starts it again."""

    reason = "busy"


class RuleError(ConfigError):
    """A rule file that does not validate; names the file and the field."""

    reason = "rule"

    def __init__(self, message: str, *, file: str | Path, field: str | None = None) -> None:
        super().__init__(message, path=file, stage="rules")
        self.file = str(file)
        self.field = field

    def __str__(self) -> str:
        where = f"{self.file}: {self.field}" if self.field else self.file
        return f"{where}: {self.message}"


class InputError(SinkwatchError):
    """A source image that cannot be turned into pixels."""

    reason = "corrupt"

    def __init__(self, message: str, **fields: object) -> None:
        fields.setdefault("stage", "decode")
        super().__init__(message, **fields)  # type: ignore[arg-type]


class IncompleteImage(InputError):
    """Truncated or still being written: retry later, never a result."""

    reason = "incomplete"
    transient = True


class CorruptImage(InputError):
    reason = "corrupt"


class UnsupportedImage(InputError):
    """Not an image at all, or a format/mode sinkwatch does not read."""

    reason = "unsupported"


class ImageTooLarge(InputError):
    """Over the byte limit (``too_large``) or a decompression bomb (``bomb``)."""

    reason = "too_large"


class MadeFromFrame(InputError):
    """An image ComfyUI made from one of sinkwatch's own frames (see service.made_from_frame): what a video job
    saved, not a new start frame. It is left alone, and counted as ``ignored``, not as a rejection."""

    reason = "from_frame"


class PublishError(SinkwatchError):
    """Writing to the queue failed (disk full, read-only, permissions): retried."""

    reason = "publish"
    transient = True

    def __init__(self, message: str, **fields: object) -> None:
        fields.setdefault("stage", "publish")
        super().__init__(message, **fields)  # type: ignore[arg-type]


# The remote ComfyUI (service.comfyui): unavailable is transient, rejected (a 4xx) is final since the same
# request would be refused again, pending is neither (accepted, not finished yet).
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


class Stopped(KeyboardInterrupt):
    """A one-shot command stopped by a signal (SIGINT, SIGTERM, SIGHUP); it exits with 128 + the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
