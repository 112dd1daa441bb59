"""Uploads to ComfyUI as the daemon and `sinkwatch process` set them up, and how a run that ends waits for them.

A run that ends (`run --once`, `process`) sends what it published before it
exits, unless ComfyUI is down (for a few seconds: not one slow answer): then the
uploads stay owed in the ledger, the next run sends them, and the run says so
and counts as unfinished.
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

# How long a run that ends keeps trying a ComfyUI that stopped answering before it leaves the uploads owed: one
# slow answer or 500 is a hiccup that the retries after 1 s and 2 s get past, not a reason to exit 1.
DOWN_GRACE = 5.0


def uploads_for(
    settings: Settings, *, ledger: Ledger, engine: Engine, metrics: Metrics, watch_jobs: bool = False
) -> Uploads | None:
    """The uploader `settings` ask for (None without --comfyui-url), fed by `engine`'s publications.

    `watch_jobs`: also ask ComfyUI, every `comfyui_check_every` seconds, how the video jobs it queued ended
    (a daemon that keeps running; a run that ends would not see them end).
    """
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
        check_jobs_every=settings.comfyui_check_every if watch_jobs else 0.0,
        requeue_lost=settings.comfyui_requeue_lost,
    )
    uploads.resume()
    engine.on_published = uploads.enqueue
    return uploads


def settled(uploads: Uploads | None) -> bool:
    """Nothing more to wait for: everything sent (or refused for good), or ComfyUI down for `DOWN_GRACE` seconds."""
    if uploads is None or uploads.idle():
        return True
    since = uploads.status.down_since
    return since is not None and uploads.status.clock() - since >= DOWN_GRACE


def finish(uploads: Uploads, *, interval: float = 0.1, sleep: Callable[[float], None] = time.sleep) -> int:
    """Send what is owed until done or ComfyUI stays down (see `settled`); returns the uploads left owed."""
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
