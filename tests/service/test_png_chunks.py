"""service.png_chunks: the PNG walk keeps what decoding uses, not a record per chunk, and refuses a file
stuffed with more chunks than any encoder writes."""

from __future__ import annotations

import functools
import io
import struct
import tracemalloc
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from service.decode import decode_bytes
from service.errors import ImageTooLarge
from service.png_chunks import walk_chunks
from tests.conftest import load_photo

CHUNK_LIMIT = 1 << 16  # the documented limit, stated here so that the test does not take it from the code


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def chunk_kinds(png: bytes) -> list[bytes]:
    kinds, pos = [], 8
    while pos < len(png):
        kinds.append(png[pos + 4 : pos + 8])
        pos += 12 + int.from_bytes(png[pos : pos + 4], "big")
    return kinds


@functools.cache
def rgb() -> np.ndarray:
    return np.ascontiguousarray(load_photo("astronaut")[:96, :128])


@functools.cache
def opencv_png() -> bytes:
    """What OpenCV writes: IHDR, IDATs of 8 KiB, IEND."""
    return cv2.imencode(".png", cv2.cvtColor(rgb(), cv2.COLOR_RGB2BGR))[1].tobytes()


def stuffed(total: int) -> bytes:
    """opencv_png() with empty private ancillary chunks after IHDR, `total` chunks in all."""
    png = opencv_png()
    return png[:33] + chunk(b"abCd", b"") * (total - len(chunk_kinds(png))) + png[33:]


def decode(data: bytes) -> np.ndarray:
    return decode_bytes(data, path="watch/source.png", max_pixels=10**8).rgb


@pytest.mark.parametrize("total", [CHUNK_LIMIT + 1, 1_000_000])
def test_more_chunks_than_the_limit_is_a_bomb(total: int) -> None:
    """Before: decoded, a million chunks after 4 s and 145 MB of records of empty chunks."""
    with pytest.raises(ImageTooLarge, match="chunks") as raised:
        decode(stuffed(total))
    assert raised.value.reason == "bomb" and raised.value.path == "watch/source.png"


def test_up_to_the_limit_decodes() -> None:
    assert np.array_equal(decode(stuffed(CHUNK_LIMIT)), rgb())


def test_the_walk_costs_no_memory_per_chunk() -> None:
    """Before: a tuple per chunk, kept and walked three times (2.7 MB traced for 20,000 chunks)."""
    data = stuffed(20_000)
    tracemalloc.start()
    try:
        pixels = decode(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(pixels, rgb())
    assert peak < 256 << 10  # the decoded pixels are 36 KiB


def test_the_walk_keeps_what_decoding_uses() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", '{"3": {}}')
    info.add_itxt("workflow", "{}", zip=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    Image.fromarray(rgb()).quantize(32).save(out, format="PNG", pnginfo=info, exif=exif.tobytes(), transparency=0)
    png = out.getvalue()
    kinds = chunk_kinds(png)
    found = walk_chunks(png, "watch/source.png")
    assert found.ihdr == png[16:29] and found.ihdr_end == 33
    assert found.trns is not None and found.exif == exif.tobytes()[6:]  # Pillow drops the "Exif" header
    assert [kind for kind, *_ in found.text] == [k for k in kinds if k in (b"tEXt", b"zTXt", b"iTXt")] != []
    assert found.idat is not None and png[found.idat[0] + 4 : found.idat[0] + 8] == b"IDAT"
    assert png[found.idat[1] + 4 : found.idat[1] + 8] == kinds[kinds.index(b"IDAT") + kinds.count(b"IDAT")]
    assert found.iend == (len(png) - 12, len(png)) and not found.idat_split and not found.apng


def test_idat_runs_and_animation_chunks_are_flagged() -> None:
    png = opencv_png()
    first, second = png.index(b"IDAT") - 4, png.rindex(b"IDAT") - 4
    found = walk_chunks(png, "watch/source.png")
    assert found.idat == (first, len(png) - 12) and not found.idat_split
    split = png[:second] + chunk(b"tEXt", b"k\0v") + png[second:]
    assert walk_chunks(split, "watch/source.png").idat_split
    animated = io.BytesIO()
    Image.fromarray(rgb()).save(animated, format="PNG", save_all=True, append_images=[Image.fromarray(rgb()[::-1])])
    assert walk_chunks(animated.getvalue(), "watch/source.png").apng
