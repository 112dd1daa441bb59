"""service.encode: lossless, Pillow-readable PNGs with text, byte for byte deterministic.

Each property holds for both encoders: fpng (the `fast` extra) and the zlib writer.
"""

from __future__ import annotations

import importlib.util
import io
import json
import struct
import sys
import zlib
from collections.abc import Iterator
from types import ModuleType

import cv2
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from service import encode
from service.decode import decode_bytes
from service.encode import encode_png
from tests.conftest import PHOTO_NAMES, fast_extra, load_photo

COMFY_TEXT = {
    "prompt": json.dumps({"3": {"class_type": "KSampler", "inputs": {"seed": 7, "text": "a cat, ç'est beau"}}}),
    "workflow": json.dumps({"nodes": [{"id": n, "type": "CLIPTextEncode"} for n in range(50)]}),
    "caption": "猫 in the rain ☔",
}


@pytest.fixture(params=["fpng", "zlib"])
def encoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Each encoder in turn, as PNG_ENCODER selects it."""
    if request.param == "fpng":
        fast_extra("fpng")
    monkeypatch.setattr(encode, "PNG_ENCODER", request.param)
    yield request.param


def zlib_png(rgb: np.ndarray) -> bytes:
    """The zlib writer's PNG, what sinkwatch writes without fpng (its format is checked on its own below)."""
    return encode._zlib_encode(np.ascontiguousarray(rgb))


def reference_png(rgb: np.ndarray, encoder: str) -> bytes:
    """What `encoder` itself writes for `rgb`, without text."""
    if encoder == "fpng":
        import fpng

        return bytes(fpng.from_ndarray(rgb))
    return zlib_png(rgb)


def chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk, asserting each CRC on the way."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    found, pos = [], 8
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind, data = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", png[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + data), kind
        found.append((kind, data))
        pos += 12 + length
    assert found[-1][0] == b"IEND" and pos == len(png)
    return found


@pytest.mark.parametrize("name", PHOTO_NAMES)
def test_pillow_opencv_and_our_decoder_read_back_the_exact_pixels(name: str, encoder: str) -> None:
    rgb = load_photo(name)
    png = encode_png(rgb, text=COMFY_TEXT)
    with Image.open(io.BytesIO(png)) as im:
        assert im.mode == "RGB"
        assert np.array_equal(np.asarray(im), rgb)
    from_opencv = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR_RGB)
    assert from_opencv is not None and np.array_equal(from_opencv, rgb)
    decoded = decode_bytes(png, path="out.png", max_pixels=10**8)
    assert np.array_equal(decoded.rgb, rgb) and decoded.text == COMFY_TEXT


def test_text_goes_in_latin1_as_text_and_the_rest_as_itxt_right_after_ihdr(encoder: str) -> None:
    png = encode_png(load_photo("chelsea"), text=COMFY_TEXT)
    found = chunks(png)
    assert [kind for kind, _ in found[:4]] == [b"IHDR", b"tEXt", b"tEXt", b"iTXt"]
    assert found[1][1] == b"prompt\0" + COMFY_TEXT["prompt"].encode("latin-1")
    assert found[3][1] == b"caption\0\0\0\0\0" + COMFY_TEXT["caption"].encode("utf-8")
    with Image.open(io.BytesIO(png)) as im:
        assert isinstance(im, PngImagePlugin.PngImageFile) and im.text == COMFY_TEXT


def test_without_text_the_bytes_are_the_encoders_own(encoder: str) -> None:
    rgb = load_photo("coffee")
    reference = reference_png(rgb, encoder)
    assert encode_png(rgb) == reference == encode_png(rgb, text={})
    text_chunk = struct.pack(">I", 3) + b"tEXt" + b"k\0v" + struct.pack(">I", zlib.crc32(b"tEXtk\0v"))
    assert encode_png(rgb, text={"k": "v"}) == reference[:33] + text_chunk + reference[33:]


def test_same_input_same_bytes(encoder: str) -> None:
    rgb = load_photo("rocket")
    first = encode_png(rgb, text=COMFY_TEXT)
    assert encode_png(rgb.copy(), text=dict(COMFY_TEXT)) == first
    changed = rgb.copy()
    changed[0, 0, 0] ^= 1
    assert encode_png(changed, text=COMFY_TEXT) != first


def test_grey_and_strided_inputs(encoder: str) -> None:
    rgb = load_photo("astronaut")
    grey = np.ascontiguousarray(rgb[..., 1])
    with Image.open(io.BytesIO(encode_png(grey))) as im:
        assert im.mode == "L" and np.array_equal(np.asarray(im), grey)
    flipped = rgb[::-1, ::-2]  # a negative-stride view, as a crop or mirror hands it over
    with Image.open(io.BytesIO(encode_png(flipped))) as im:
        assert np.array_equal(np.asarray(im), flipped)


@pytest.mark.parametrize(
    ("rgb", "error"),
    [
        (np.zeros((4, 4, 3), np.float32), TypeError),
        (np.zeros((4, 4, 4), np.uint8), ValueError),
        (np.zeros((0, 4, 3), np.uint8), ValueError),
        ([[0, 0, 0]], TypeError),
    ],
)
def test_bad_images_are_refused(rgb: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="rgb"):
        encode_png(rgb)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text",
    [{"": "v"}, {"k" * 80: "v"}, {"a\0b": "v"}, {"ключ": "v"}, {"k": "a\0b"}, {"k": 3}],
)
def test_bad_text_is_refused(text: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="text"):
        encode_png(np.zeros((2, 2, 3), np.uint8), text=text)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["astronaut", "china"])
@pytest.mark.parametrize("grey", [False, True], ids=["rgb", "grey"])
def test_the_zlib_writer_writes_up_filtered_rows_in_one_idat(name: str, grey: bool) -> None:
    rgb = load_photo(name)
    pixels = np.ascontiguousarray(rgb[..., 1]) if grey else rgb
    found = chunks(zlib_png(pixels))
    assert [kind for kind, _ in found] == [b"IHDR", b"IDAT", b"IEND"]
    height, width = pixels.shape[:2]
    assert found[0][1] == struct.pack(">IIBBBBB", width, height, 8, 0 if grey else 2, 0, 0, 0)
    rows = np.frombuffer(zlib.decompress(found[1][1]), np.uint8).reshape(height, -1)
    assert (rows[:, 0] == 2).all(), "every row Up-filtered"
    assert len(found[1][1]) < 0.9 * rows.nbytes, "deflated, not stored"
    # Undoing Up is a running sum down each column, modulo 256.
    unfiltered = np.cumsum(rows[:, 1:], axis=0, dtype=np.uint64) % 256
    assert np.array_equal(unfiltered.astype(np.uint8).reshape(pixels.shape), pixels)


# --- which encoder, and falling back to the zlib writer -----------------------------------------


def test_fpng_is_used_for_rgb_when_installed_and_grey_goes_to_the_zlib_writer() -> None:
    fpng = fast_extra("fpng")
    assert encode.PNG_ENCODER == "fpng"
    rgb = load_photo("chelsea")
    assert encode_png(rgb) == fpng.from_ndarray(rgb) != zlib_png(rgb)
    grey = np.ascontiguousarray(rgb[..., 0])
    assert encode_png(grey) == zlib_png(grey)


def fresh_encode_module(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """service/encode.py imported anew, as a process without the `fast` extra imports it."""
    monkeypatch.setitem(sys.modules, "fpng", None)  # `import fpng` now raises ImportError
    spec = importlib.util.spec_from_file_location("encode_without_fpng", encode.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_fpng_installed_the_bytes_are_the_zlib_writers(monkeypatch: pytest.MonkeyPatch) -> None:
    without = fresh_encode_module(monkeypatch)
    assert without.PNG_ENCODER == "zlib"
    rgb = load_photo("rocket")
    assert without.encode_png(rgb) == zlib_png(rgb)
    monkeypatch.setattr(without, "PNG_ENCODER", "fpng")  # asked for, but not installed: still the zlib writer
    png = without.encode_png(rgb, text=COMFY_TEXT)
    assert png[:33] == zlib_png(rgb)[:33] and png.endswith(zlib_png(rgb)[33:])
    with Image.open(io.BytesIO(png)) as im:
        assert isinstance(im, PngImagePlugin.PngImageFile)
        assert im.text == COMFY_TEXT and np.array_equal(np.asarray(im), rgb)


class BrokenFpng:
    """Stands in for fpng: raises, or returns what fpng 0.1.0 returns on failure, or a wrong header."""

    def __init__(self, result: bytes | Exception) -> None:
        self.result = result
        self.calls = 0

    def from_ndarray(self, rgb: np.ndarray) -> bytes:
        self.calls += 1
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


@pytest.mark.parametrize(
    "result",
    [
        RuntimeError("fpng_encode_image_to_memory() failed!"),
        AttributeError("Must have 3 dimensions"),
        b"",  # fpng 0.1.0 builds its RuntimeError but never raises it: failure is empty bytes
        b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 14) + b"IHDR" + bytes(14),  # IHDR not where text goes
        zlib_png(np.zeros((3, 2, 3), np.uint8)),  # a valid PNG of another image
    ],
    ids=["runtime-error", "attribute-error", "empty", "odd-ihdr", "wrong-size"],
)
def test_when_fpng_fails_the_zlib_writer_writes_the_frame(
    monkeypatch: pytest.MonkeyPatch, result: bytes | Exception
) -> None:
    broken = BrokenFpng(result)
    monkeypatch.setattr(encode, "_fpng", broken)
    monkeypatch.setattr(encode, "PNG_ENCODER", "fpng")
    rgb = load_photo("astronaut")
    reference = zlib_png(rgb)
    assert encode_png(rgb) == reference
    text_chunk = struct.pack(">I", 3) + b"tEXt" + b"k\0v" + struct.pack(">I", zlib.crc32(b"tEXtk\0v"))
    assert encode_png(rgb, text={"k": "v"}) == reference[:33] + text_chunk + reference[33:]
    assert broken.calls == 2


def test_the_zlib_writer_can_be_chosen_while_fpng_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = BrokenFpng(RuntimeError("must not be called"))
    monkeypatch.setattr(encode, "_fpng", broken)
    monkeypatch.setattr(encode, "PNG_ENCODER", "zlib")
    rgb = load_photo("china")
    assert encode_png(rgb) == zlib_png(rgb) and broken.calls == 0
