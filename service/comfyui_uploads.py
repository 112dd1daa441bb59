"""Uploads to ComfyUI as the daemon and `sinkwatch process` set them up, and how a run that ends waits for them.

A run that ends (`run --once`, `process`) sends what it published before it
exits, unless ComfyUI is down: then the uploads stay owed in the ledger, the
next run sends them, and the run says so and counts as unfinished.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from loguru import logger

from service.comfyui import ComfyClient
from service.engine import Engine
from service.ledger import Ledger
from service.metrics import Metrics
from service.settings import Settings
from service.uploader import Uploads
from service.workflow import load_workflow


def uploads_for(settings: Settings, *, ledger: Ledger, engine: Engine, metrics: Metrics) -> Uploads | None:
    """The uploader `settings` ask for (None without --comfyui-url), fed by `engine`'s publications."""
    if not settings.comfyui_url:
        return None
    uploads = Uploads(
        client=ComfyClient(
            settings.comfyui_url, timeout=settings.comfyui_timeout, subfolder=settings.comfyui_subfolder
        ),
        ledger=ledger,
        publisher=engine.publisher,
        metrics=metrics,
        workflow=load_workflow(settings.comfyui_workflow) if settings.comfyui_workflow else None,
        busy=engine.publishing,
    )
    uploads.resume()
    engine.on_published = uploads.enqueue
    return uploads


def settled(uploads: Uploads | None) -> bool:
    """Nothing more to wait for: everything sent (or refused for good), or ComfyUI is down."""
    return uploads is None or uploads.down or uploads.idle()


def finish(uploads: Uploads, *, interval: float = 0.1, sleep: Callable[[float], None] = time.sleep) -> int:
    """Send what is owed until done or ComfyUI is down, stop the uploader; returns the uploads left owed."""
    while not settled(uploads):
        uploads.pump()
        sleep(interval)
    return owed(uploads)


def owed(uploads: Uploads) -> int:
    """Uploads left pending in the ledger, said once in the log when there are any."""
    left = uploads.ledger.pending_upload_count()
    if left:
        logger.warning(
            "{} uploads to ComfyUI at {} are still owed (it is down); the next run sends them",
            left,
            uploads.client.base_url,
        )
    return left
