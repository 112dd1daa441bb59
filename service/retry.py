"""Retrying transient failures: capped exponential backoff, and a loop that keeps at it until stopped.

Kept apart from the ComfyUI client because nothing here is about ComfyUI:
the uploader retries a ComfyUI that is down with it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)


def backoff(attempt: int, *, base: float, cap: float) -> float:
    """Delay after the ``attempt``-th failure: ``base * 2**(attempt-1)``, at most ``cap``."""
    return min(cap, base * 2.0 ** min(attempt - 1, 64))  # the cap applies long before 2**64 overflows


def keep_trying(
    call: Callable[[], T],
    *,
    transient: type[E],
    base: float,
    cap: float,
    stop: threading.Event,
    failed: Callable[[E, float], object],
) -> T:
    """Call until it no longer raises ``transient``; after each such failure tell ``failed`` (error, delay) and wait.

    There is no attempt limit: what is retried must not be dropped, however
    long the outage lasts. Setting ``stop`` cuts a wait short and raises the
    last failure; any other exception goes straight to the caller.
    """
    failures = 0
    while True:
        try:
            return call()
        except transient as error:
            failures += 1
            delay = backoff(failures, base=base, cap=cap)
            failed(error, delay)
            if stop.wait(delay):
                raise
