"""Distinct small images cut from the real photographs, encoded as a generator would."""

from __future__ import annotations

import io
import random
from typing import Any

import numpy as np
from PIL import Image

from tests.conftest import PHOTO_NAMES


class Images:
    """Distinct small images cut from the real photographs; image `i` is always the same bytes.

    Photo ``i % 7`` is downscaled (area filter) so that its short side is twice
    `side`, a seeded crop of ``side x side`` is taken, and `i` is written into
    the first four pixels so that no two indices share content.
    """

    def __init__(self, photos: dict[str, np.ndarray]) -> None:
        self.photos = photos
        self._scaled: dict[tuple[str, int], np.ndarray] = {}

    def rgb(self, i: int, *, side: int = 128) -> np.ndarray:
        name = PHOTO_NAMES[i % len(PHOTO_NAMES)]
        base = self._base(name, 2 * side)
        rng = random.Random(f"{i}-{side}")
        y = rng.randrange(base.shape[0] - side + 1)
        x = rng.randrange(base.shape[1] - side + 1)
        crop = base[y : y + side, x : x + side].copy()
        crop[0, :4, 0] = np.frombuffer(i.to_bytes(4, "big"), np.uint8)
        return crop

    def make(self, i: int, *, fmt: str = "PNG", side: int = 128) -> bytes:
        return encode(self.rgb(i, side=side), fmt)

    def _base(self, name: str, short: int) -> np.ndarray:
        key = (name, short)
        if key not in self._scaled:
            photo = self.photos[name]
            scale = short / min(photo.shape[:2])
            size = (max(short, round(photo.shape[1] * scale)), max(short, round(photo.shape[0] * scale)))
            self._scaled[key] = np.asarray(Image.fromarray(photo).resize(size, Image.Resampling.BOX))
        return self._scaled[key]


def encode(rgb: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    options: dict[str, Any] = {"PNG": {"compress_level": 1}, "JPEG": {"quality": 90}, "WEBP": {"quality": 80}}[fmt]
    Image.fromarray(rgb).save(buffer, format=fmt, **options)
    return buffer.getvalue()
