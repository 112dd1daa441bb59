"""service.decode on valid files in variants the decoders do not read: UnsupportedImage naming the variant,
with a message that is the same every run; damage stays CorruptImage and a cut file IncompleteImage."""

from __future__ import annotations

import functools
import io
import struct
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

from service.decode import decode_bytes
from service.errors import CorruptImage, IncompleteImage, InputError, UnsupportedImage
from tests.conftest import load_photo


@functools.cache
def rgb() -> np.ndarray:
    return np.ascontiguousarray(load_photo("coffee")[100:140, 200:250])


def decode_error(data: bytes) -> InputError:
    with pytest.raises(InputError) as raised:
        decode_bytes(data, path="watch/source.img", max_pixels=10**8)
    with pytest.raises(InputError) as again:
        decode_bytes(data, path="watch/source.img", max_pixels=10**8)
    assert again.value.message == raised.value.message  # no object address or other run-to-run detail
    assert "object at" not in raised.value.message and "0x7f" not in raised.value.message
    return raised.value


def opencv(ext: str, pixels: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(ext, pixels)
    assert ok
    return encoded.tobytes()


def tifffile_bytes(pixels: np.ndarray, **options: Any) -> bytes:
    out = io.BytesIO()
    tifffile.imwrite(out, pixels, **options)
    return out.getvalue()


def pillow(im: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    im.save(out, format=fmt)
    return out.getvalue()


def tiff_tag_patched(data: bytes, tag: int, value: bytes) -> bytes:
    """`data` with the (first) value of `tag` in its first directory replaced."""
    at = tifffile.TiffFile(io.BytesIO(data)).pages.first.tags[tag].valueoffset
    return data[:at] + value + data[at + len(value) :]


def bmp_holding_a_jpeg() -> bytes:
    """BI_JPEG (compression 4): valid BMP for printers, a JPEG as its pixel data. No library here writes one,
    so Pillow's BMP header is given that compression and a JPEG Pillow wrote."""
    jpeg = pillow(Image.fromarray(rgb()), "JPEG")
    header = bytearray(pillow(Image.fromarray(rgb()), "BMP")[:54])
    struct.pack_into("<I", header, 2, 54 + len(jpeg))  # file size
    struct.pack_into("<I", header, 10, 54)  # pixel data offset
    struct.pack_into("<II", header, 30, 4, len(jpeg))  # compression, image size
    return bytes(header) + jpeg


VARIANTS: dict[str, tuple[Callable[[], bytes], str]] = {
    "OpenCV float32 RGB TIFF": (lambda: opencv(".tiff", rgb().astype(np.float32) / 255), "32-bit floating-point"),
    "OpenCV float64 grey TIFF": (lambda: opencv(".tiff", rgb()[..., 0] / 255.0), "64-bit floating-point"),
    "float16 RGB TIFF": (
        lambda: tifffile_bytes(rgb().astype(np.float16), photometric="rgb"),
        "16-bit floating-point samples, 3 per pixel",
    ),
    "int32 RGB TIFF": (lambda: tifffile_bytes(rgb().astype(np.int32), photometric="rgb"), "32-bit signed integer"),
    "complex TIFF": (lambda: tifffile_bytes(rgb()[..., 0].astype(np.complex64)), "complex floating-point"),
    "JPEG 2000 TIFF": (
        lambda: tiff_tag_patched(pillow(Image.fromarray(rgb()), "TIFF"), 259, struct.pack("<H", 34712)),
        "JPEG 2000",
    ),
    "BMP holding a JPEG": (bmp_holding_a_jpeg, "BMP with 24 bits per pixel and JPEG compression"),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variants_pillow_does_not_read_are_unsupported_and_named(name: str) -> None:
    make, described = VARIANTS[name]
    error = decode_error(make())
    assert isinstance(error, UnsupportedImage) and error.reason == "unsupported", repr(error)
    assert described in error.message and error.path == "watch/source.img"


def test_a_12_bit_jpeg_is_unsupported() -> None:
    """Its header, at least: Pillow (libjpeg at 8 bits) refuses at the frame header."""
    data = bytearray(pillow(Image.fromarray(rgb()), "JPEG"))
    data[data.index(b"\xff\xc0") + 4] = 12  # the frame's sample precision
    error = decode_error(bytes(data))
    assert isinstance(error, UnsupportedImage) and "JPEG with 12-bit samples" in error.message


def test_damage_pillow_cannot_read_is_still_corrupt() -> None:
    tiff = pillow(Image.fromarray(rgb()), "TIFF")
    bmp = pillow(Image.fromarray(rgb()), "BMP")
    damaged = {
        # 3 samples per pixel, bits per sample 8, 8, 9: no writer makes that
        "TIFF bits per sample": tiff_tag_patched(tiff, 258, struct.pack("<HHH", 8, 8, 9)),
        "TIFF photometric 77": tiff_tag_patched(tiff, 262, struct.pack("<H", 77)),
        "BMP of 7 bits per pixel": bmp[:28] + struct.pack("<H", 7) + bmp[30:],
    }
    for name, data in damaged.items():
        error = decode_error(data)
        assert isinstance(error, CorruptImage) and error.reason == "corrupt", (name, repr(error))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_an_unsupported_variant_cut_short_is_still_incomplete(name: str) -> None:
    data = VARIANTS[name][0]()
    error = decode_error(data[: len(data) - 100])
    assert isinstance(error, IncompleteImage) and error.transient, (name, repr(error))
