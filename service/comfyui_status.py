"""Whether the remote ComfyUI answers, as the uploader's main thread sees it: one metric, two log lines.

A request that fails transiently means "down"; any answer from ComfyUI
(an upload stored, a prompt queued, even a request it refused) means "up".
The change is logged once each way, not at every retry, and
``sinkwatch_comfyui_up`` follows it (absent until the first request).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from loguru import logger

from service.metrics import Metrics


class ComfyStatus:
    def __init__(self, *, url: str, metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self.metrics = metrics
        self.clock = clock
        self.down_since: float | None = None  # when ComfyUI stopped answering

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def failed(self, error: BaseException | None, *, name: str, delay: float) -> None:
        """A request for frame `name` failed transiently; it is tried again in `delay` seconds."""
        self.metrics.set_comfyui_up(False)
        if self.down_since is None:
            self.down_since = self.clock()
            # The frame too: a ComfyUI that answers 5xx to that one frame only holds up every upload behind it.
            logger.bind(url=self.url, reason=getattr(error, "reason", None), frame=name).warning(
                "ComfyUI is down ({}, sending {}); uploads stay pending and are retried with backoff, "
                "frames keep publishing",
                error,
                name,
            )
        else:
            logger.debug("ComfyUI still down, retrying {} in {:.1f}s: {}", name, delay, error)

    def answered(self, pending: Callable[[], int]) -> None:
        """ComfyUI answered a request; `pending` counts the uploads still owed (asked only when it comes back)."""
        self.metrics.set_comfyui_up(True)
        if self.down_since is None:
            return
        seconds = self.clock() - self.down_since
        self.down_since = None
        logger.bind(url=self.url).info("ComfyUI is back after {:.0f}s; sending {} pending uploads", seconds, pending())
