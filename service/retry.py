"""Capped exponential backoff for retrying transient failures.

Kept apart from the ComfyUI client because nothing here is about ComfyUI:
the uploader spaces its retries of a ComfyUI that is down with it.
"""

from __future__ import annotations


def backoff(attempt: int, *, base: float, cap: float) -> float:
    """Delay after the ``attempt``-th failure: ``base * 2**(attempt-1)``, at most ``cap``."""
    return min(cap, base * 2.0 ** min(attempt - 1, 64))  # the cap applies long before 2**64 overflows
