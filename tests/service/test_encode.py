"""service.encode: lossless, Pillow-readable PNGs with text, byte for byte deterministic."""

from __future__ import annotations

import io
import json
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from service.decode import decode_bytes
from service.encode import encode_png
from tests.conftest import PHOTO_NAMES, load_photo

COMFY_TEXT = {
    "prompt": json.dumps({"3": {"class_type": "KSampler", "inputs": {"seed": 7, "text": "a cat, ç'est beau"}}}),
    "workflow": json.dumps({"nodes": [{"id": n, "type": "CLIPTextEncode"} for n in range(50)]}),
    "caption": "猫 in the rain ☔",
}


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
def test_pillow_opencv_and_our_decoder_read_back_the_exact_pixels(name: str) -> None:
    rgb = load_photo(name)
    png = encode_png(rgb, text=COMFY_TEXT)
    with Image.open(io.BytesIO(png)) as im:
        assert im.mode == "RGB"
        assert np.array_equal(np.asarray(im), rgb)
    assert np.array_equal(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR_RGB), rgb)
    decoded = decode_bytes(png, path="out.png", max_pixels=10**8)
    assert np.array_equal(decoded.rgb, rgb) and decoded.text == COMFY_TEXT


def test_text_goes_in_latin1_as_text_and_the_rest_as_itxt_right_after_ihdr() -> None:
    png = encode_png(load_photo("chelsea"), text=COMFY_TEXT)
    found = chunks(png)
    assert [kind for kind, _ in found[:4]] == [b"IHDR", b"tEXt", b"tEXt", b"iTXt"]
    assert found[1][1] == b"prompt\0" + COMFY_TEXT["prompt"].encode("latin-1")
    assert found[3][1] == b"caption\0\0\0\0\0" + COMFY_TEXT["caption"].encode("utf-8")
    with Image.open(io.BytesIO(png)) as im:
        assert im.text == COMFY_TEXT


def test_without_text_the_bytes_are_opencvs_default_encoding() -> None:
    rgb = load_photo("coffee")
    _, reference = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert encode_png(rgb) == reference.tobytes() == encode_png(rgb, text={})
    text_chunk = struct.pack(">I", 3) + b"tEXt" + b"k\0v" + struct.pack(">I", zlib.crc32(b"tEXtk\0v"))
    assert encode_png(rgb, text={"k": "v"}) == reference.tobytes()[:33] + text_chunk + reference.tobytes()[33:]


def test_same_input_same_bytes() -> None:
    rgb = load_photo("rocket")
    first = encode_png(rgb, text=COMFY_TEXT)
    assert encode_png(rgb.copy(), text=dict(COMFY_TEXT)) == first
    changed = rgb.copy()
    changed[0, 0, 0] ^= 1
    assert encode_png(changed, text=COMFY_TEXT) != first


def test_grey_and_strided_inputs() -> None:
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
