"""Fixtures shared by the service tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fake_comfyui import FakeComfyUI


@pytest.fixture
def comfy() -> Iterator[FakeComfyUI]:
    """A fake ComfyUI server on loopback, checked for internal errors when the test ends."""
    with FakeComfyUI() as fake:
        yield fake
    assert fake.errors == [], "the fake server hit an internal error"
