"""The benchmark corpus: real photographs at image-generator sizes, made on the fly.

The photographs are those of the test extra (scikit-image and scikit-learn
ship them, see tests/conftest.py). Each is centre-cropped to the aspect ratio
of a generator size and resized to it (Lanczos up, area down), then saved the
way the generator would: PNG through Pillow at compress level 4 with ComfyUI's
``prompt``/``workflow`` text chunks, or JPEG / WebP at quality 90. The same
configuration always gives the same bytes.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, PngImagePlugin

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "china", "flower")
# (width, height) of SDXL/Flux-style generator outputs.
GENERATOR_SIZES = ((1024, 1024), (832, 1216), (1216, 832), (1344, 768))
# Formats other than PNG are made at this size only.
OTHER_FORMAT_SIZE = (1024, 1024)
QUALITY = 90
PNG_LEVEL = 4  # ComfyUI's SaveImage

# Stand-ins for ComfyUI's metadata: small, fixed, valid JSON.
_PROMPT = {"3": {"class_type": "KSampler", "inputs": {"seed": 42, "steps": 20, "cfg": 7.0, "denoise": 1.0}}}
_WORKFLOW = {"nodes": [{"id": i, "type": "KSampler" if i == 3 else "Node", "pos": [10 * i, 20]} for i in range(40)]}


@dataclass(frozen=True)
class Source:
    path: Path
    photo: str
    format: str  # "PNG", "JPEG", "WEBP"
    size: tuple[int, int]  # (width, height)

    @property
    def group(self) -> str:
        """What results are grouped by: format and size, e.g. "PNG 1024x1024"."""
        return f"{self.format} {self.size[0]}x{self.size[1]}"

    @property
    def megabytes(self) -> float:
        return self.path.stat().st_size / 1e6


def load_photo(name: str) -> np.ndarray:
    """A photograph of the test extra as RGB uint8 (H, W, 3), as tests/conftest.py loads it."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return np.ascontiguousarray(load_sample_image(f"{name}.jpg"))
    import skimage.data

    if name == "motorcycle_left":
        return np.ascontiguousarray(skimage.data.stereo_motorcycle()[0])
    return np.ascontiguousarray(getattr(skimage.data, name)())


def at_size(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`rgb` centre-cropped to the aspect ratio of `size` (w, h) and resized to it."""
    width, height = size
    h, w = rgb.shape[:2]
    if w * height > h * width:
        crop_w = round(h * width / height)
        rgb = rgb[:, (w - crop_w) // 2 : (w - crop_w) // 2 + crop_w]
    else:
        crop_h = round(w * height / width)
        rgb = rgb[(h - crop_h) // 2 : (h - crop_h) // 2 + crop_h]
    flag = cv2.INTER_LANCZOS4 if width > rgb.shape[1] else cv2.INTER_AREA
    return np.ascontiguousarray(cv2.resize(rgb, size, interpolation=flag))


def encode(rgb: np.ndarray, fmt: str) -> bytes:
    """`rgb` saved as the generator saves it, in `fmt` ("PNG", "JPEG" or "WEBP")."""
    buffer = io.BytesIO()
    image = Image.fromarray(rgb)
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("prompt", json.dumps(_PROMPT))
        info.add_text("workflow", json.dumps(_WORKFLOW))
        image.save(buffer, format="PNG", compress_level=PNG_LEVEL, pnginfo=info)
    else:
        image.save(buffer, format=fmt, quality=QUALITY)
    return buffer.getvalue()


def build_corpus(
    folder: Path,
    *,
    photos: Sequence[str] = PHOTOS,
    sizes: Sequence[tuple[int, int]] = GENERATOR_SIZES,
    other_formats: Sequence[str] = ("JPEG", "WEBP"),
    other_size: tuple[int, int] = OTHER_FORMAT_SIZE,
) -> list[Source]:
    """Write every photo at every size as PNG, plus `other_formats` at `other_size`, into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = []
    for photo in photos:
        rgb = load_photo(photo)
        wanted = [("PNG", size) for size in sizes] + [(fmt, other_size) for fmt in other_formats]
        for fmt, size in wanted:
            path = folder / f"{photo}-{size[0]}x{size[1]}.{fmt.lower()}"
            path.write_bytes(encode(at_size(rgb, size), fmt))
            sources.append(Source(path=path, photo=photo, format=fmt, size=size))
    return sources
