"""Codec alternatives measured on the corpus: what the floor would be with other choices.

- PNG decode: OpenCV alone, sinkwatch's `decode_bytes` (the container walk,
  the guards and the SHA-256 around the decoder in use, and around OpenCV as
  a plain install has it), and libspng (`pyspng`) alone, whose pixels must
  equal OpenCV's;
- PNG encode of the published frame and heatmap: sinkwatch's `encode_png`
  (the encoder in use, and the zlib writer as a plain install has it),
  OpenCV with its default parameters and with an explicit compression level,
  and `fpng` alone, whose files Pillow (ComfyUI's reader) must decode to the
  same pixels, and whose size is compared with the zlib writer's;
- JPEG: decode + resize of a source at least twice the frame, with and
  without the reduced-scale decode (`reduce_to`, as the runner asks for it),
  and the same at generator size (where it cannot apply).
"""

from __future__ import annotations

import importlib
import io
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from benchmarks.corpus import Source, at_size, encode, load_photo
from benchmarks.machine import median_ms
from benchmarks.single import cv2_decode, plain_codecs
from core import pipeline
from core.resize import ResizeParams, resize
from service.decode import decode_bytes
from service.encode import encode_png
from service.rules import Rule

MAX_PIXELS = 100_000_000
EXPLICIT_LEVEL = 4  # any explicit level switches OpenCV's zlib strategy


def measure(sources: Sequence[Source], *, rule: Rule, folder: Path, reps: int) -> dict[str, Any]:
    """Median ms per codec choice over `sources` (PNG), and the JPEG reduced-decode comparison."""
    cv2.setNumThreads(1)
    params = rule.to_params()
    spng = _optional("pyspng")
    fpng = _optional("fpng")
    times: dict[str, list[float]] = {}
    same_spng: list[bool] = []
    same_fpng: list[bool] = []
    sizes: list[float] = []
    for source in sources:
        data = source.path.read_bytes()
        rgb = cv2_decode(data)
        result = pipeline.run(rgb, params)
        outputs = (result.cleaned, result.heatmap)
        candidates: dict[str, Callable[[], object]] = {
            "decode opencv": partial(cv2_decode, data),
            "decode sinkwatch": partial(decode_bytes, data, path=source.path, max_pixels=MAX_PIXELS),
            "decode sinkwatch, plain codecs": partial(
                _plain, decode_bytes, data, path=source.path, max_pixels=MAX_PIXELS
            ),
            "encode sinkwatch": partial(_each, encode_png, outputs),
            "encode sinkwatch, plain codecs": partial(_plain, _each, encode_png, outputs),
            "encode opencv default": partial(_each, _cv2_encode, outputs),
            "encode opencv level 4": partial(_each, _cv2_encode, outputs, EXPLICIT_LEVEL),
        }
        if spng is not None:
            candidates["decode pyspng"] = partial(spng.load, data, "RGB")
            same_spng.append(bool(np.array_equal(spng.load(data, "RGB"), rgb)))
        if fpng is not None:
            candidates["encode fpng"] = partial(_each, fpng.from_ndarray, outputs)
            same_fpng.extend(_pillow_pixels(fpng.from_ndarray(a)) == a.tobytes() for a in outputs)
            sizes.append(len(fpng.from_ndarray(result.cleaned)) / len(_plain(encode_png, result.cleaned)))
        for name, values in _interleaved(candidates, reps).items():
            times.setdefault(name, []).extend(values)
    checks = {
        "pyspng_same_pixels": all(same_spng) if same_spng else None,
        "fpng_pillow_same_pixels": all(same_fpng) if same_fpng else None,
        "fpng_size_ratio": round(float(np.median(sizes)), 3) if sizes else None,
    }
    return {
        "png_ms": {name: median_ms(values) for name, values in times.items()},
        "checks": checks,
        "jpeg": _jpeg_reduced(folder, params.resize, reps=reps),
    }


def _jpeg_reduced(folder: Path, params: ResizeParams, *, reps: int) -> dict[str, dict[str, float]]:
    """Decode + resize ms of JPEG sources, full decode vs `reduce_to` the target size."""
    folder.mkdir(parents=True, exist_ok=True)
    photo = load_photo("astronaut")
    out = {}
    for size in ((2048, 2048), (1024, 1024)):
        path = folder / f"astronaut-{size[0]}x{size[1]}.jpeg"
        path.write_bytes(encode(at_size(photo, size), "JPEG"))
        data = path.read_bytes()
        side = max(params.width, params.height)  # what service/runner.py asks for: any orientation fits
        jobs: dict[str, Callable[[], object]] = {}
        for label, reduce_to in (("full", None), ("reduced", (side, side))):

            def job(d: bytes = data, r: tuple[int, int] | None = reduce_to, p: Path = path) -> None:
                resize(decode_bytes(d, path=p, max_pixels=MAX_PIXELS, reduce_to=r).rgb, params=params)

            jobs[label] = job
        out[f"JPEG {size[0]}x{size[1]}"] = {k: median_ms(v) for k, v in _interleaved(jobs, reps).items()}
    return out


def _interleaved(calls: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Seconds of each call, `reps` times, taking turns: a change in the machine's load hits all alike."""
    out: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            out[name].append(time.perf_counter() - started)
    return out


def _plain(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`call` as a plain install (without the `fast` extra) runs it."""
    with plain_codecs():
        return call(*args, **kwargs)


def _each(encoder: Callable[..., bytes], images: Sequence[np.ndarray], *args: Any) -> list[bytes]:
    return [encoder(np.ascontiguousarray(image), *args) for image in images]


def _cv2_encode(rgb: np.ndarray, level: int | None = None) -> bytes:
    """OpenCV's PNG: its defaults (what a plain install wrote before the zlib writer), or an explicit level."""
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 else rgb
    ok, png = cv2.imencode(".png", bgr, [] if level is None else [cv2.IMWRITE_PNG_COMPRESSION, level])
    return bytes(png) if ok else b""


def _pillow_pixels(png: bytes) -> bytes:
    with Image.open(io.BytesIO(png)) as image:
        return image.tobytes()


def _optional(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None
