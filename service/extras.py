"""Modules of the optional `fast` extra (fpng, pyspng): used when installed, never required."""

from __future__ import annotations

import importlib
from types import ModuleType


def optional_module(name: str) -> ModuleType | None:
    """The module `name`, or None when it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None
