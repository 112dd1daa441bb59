"""service.decode: real photographs in every mode and format, and every kind of bad input."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, PngImagePlugin

from service.decode import TEXT_TOTAL_LIMIT, TEXT_VALUE_LIMIT, DecodedImage, decode_bytes, decode_file
from service.encode import encode_png
from service.errors import CorruptImage, ImageTooLarge, IncompleteImage, InputError, UnsupportedImage
from tests.conftest import PHOTO_NAMES, load_photo, photo_file

BIG = 10**8
T = TypeVar("T")
INPUT_ERRORS = (IncompleteImage, CorruptImage, UnsupportedImage, ImageTooLarge)


def decode(data: bytes, **kwargs: object) -> DecodedImage:
    kwargs.setdefault("max_pixels", BIG)
    return decode_bytes(data, path="watch/source.img", **kwargs)  # type: ignore[arg-type]


def encoded(im: Image.Image, fmt: str, **kwargs: object) -> bytes:
    out = io.BytesIO()
    im.save(out, format=fmt, **kwargs)
    return out.getvalue()


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def handmade_png(width: int, height: int, depth: int, colour: int, rows: bytes, *, extra: bytes = b"") -> bytes:
    """A PNG from raw scanlines (each already prefixed with its filter byte), with valid CRCs."""
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + ihdr + extra + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def scanlines(pixels: np.ndarray) -> bytes:
    rows = pixels.reshape(pixels.shape[0], -1)
    return b"".join(b"\0" + row.tobytes() for row in rows)


def composite(rgba: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    alpha = rgba[..., 3:].astype(np.float64) / 255
    return np.rint(rgba[..., :3] * alpha + np.array(background) * (1 - alpha)).astype(np.uint8)


@functools.cache
def photo(name: str) -> np.ndarray:
    return load_photo(name)


@functools.cache
def small(name: str) -> np.ndarray:
    """A 48x64 crop of a real photo, for tests that decode thousands of variants."""
    return np.ascontiguousarray(photo(name)[100:148, 100:164])


def alpha_ramp(rgb: np.ndarray) -> np.ndarray:
    """RGBA: the photo with an alpha ramp from transparent (left) to opaque (right)."""
    ramp = np.linspace(0, 255, rgb.shape[1]).round().astype(np.uint8)
    return np.dstack([rgb, np.broadcast_to(ramp, rgb.shape[:2])])


# --- the shipped photographs ----------------------------------------------------------------------


@pytest.mark.parametrize("name", PHOTO_NAMES)
def test_shipped_photo_files_decode_to_their_pixels(name: str) -> None:
    path = photo_file(name)
    result = decode_file(path, max_bytes=BIG, max_pixels=BIG)
    expected = photo(name)
    assert result.format == ("JPEG" if path.suffix == ".jpg" else "PNG")
    assert result.rgb.dtype == np.uint8 and result.rgb.shape == expected.shape and result.rgb.flags.c_contiguous
    assert result.source_size == (expected.shape[1], expected.shape[0])
    assert np.abs(result.rgb.astype(int) - expected).mean() < 1.0
    assert result.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


# --- modes and formats ----------------------------------------------------------------------------


def test_grey_palette_and_bilevel_pngs_match_pillow() -> None:
    base = Image.fromarray(photo("coffee"))
    cases = [
        (base.convert("L"), {}),
        (base.convert("P"), {}),
        (base.quantize(16), {"bits": 4}),
        (base.convert("1"), {}),
    ]
    for im, kwargs in cases:
        data = encoded(im, "PNG", **kwargs)
        reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert np.array_equal(reference, np.asarray(im.convert("RGB")))
        assert np.array_equal(decode(data).rgb, reference), im.mode


@pytest.mark.parametrize("background", [(0, 0, 0), (255, 255, 255), (10, 200, 30)])
def test_alpha_is_composited_on_the_background(background: tuple[int, int, int]) -> None:
    rgba = alpha_ramp(photo("chelsea"))
    expected = composite(rgba, background)
    for fmt in ("PNG", "WEBP", "TIFF"):
        kwargs = {"lossless": True, "exact": True} if fmt == "WEBP" else {}
        result = decode(encoded(Image.fromarray(rgba), fmt, **kwargs), background=background)
        assert np.array_equal(result.rgb, expected), fmt
    grey_alpha = Image.fromarray(rgba).convert("LA")
    la = np.asarray(grey_alpha)
    expected_la = composite(np.dstack([la[..., 0]] * 3 + [la[..., 1]]), background)
    assert np.array_equal(decode(encoded(grey_alpha, "PNG"), background=background).rgb, expected_la)


@pytest.mark.parametrize("mode", ["P", "L", "RGB"])
def test_colour_key_transparency_is_composited(mode: str) -> None:
    im = Image.fromarray(photo("astronaut")).convert(mode)
    key = 0 if mode == "P" else im.getpixel((10, 10))
    data = encoded(im, "PNG", transparency=key)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))
    assert (reference[..., 3] == 0).any()
    assert np.array_equal(decode(data, background=(0, 255, 0)).rgb, composite(reference, (0, 255, 0)))


def test_grey_colour_keys_at_2_and_16_bits_are_transparent() -> None:
    levels = np.array([[0, 1, 2, 3] * 4] * 3, np.uint8)  # 2-bit grey, 16 wide
    packed = np.packbits(np.unpackbits(levels[..., None], axis=2)[..., 6:].reshape(3, -1), axis=1)
    data = handmade_png(16, 3, 2, 0, scanlines(packed), extra=chunk(b"tRNS", struct.pack(">H", 1)))
    expected = np.dstack([levels * 85] * 3).astype(np.uint8)
    expected[levels == 1] = (255, 0, 0)
    assert np.array_equal(decode(data, background=(255, 0, 0)).rgb, expected)
    grey16 = photo("coffee")[..., 0].astype(np.uint16) * 257 + 3
    key = int(grey16[0, 0])
    data = handmade_png(600, 400, 16, 0, scanlines(grey16.astype(">u2")), extra=chunk(b"tRNS", struct.pack(">H", key)))
    expected = np.dstack([np.rint(grey16 / 257).astype(np.uint8)] * 3)
    expected[grey16 == key] = (255, 0, 0)
    assert np.array_equal(decode(data, background=(255, 0, 0)).rgb, expected)


def test_16_bit_pngs_are_scaled_not_clipped() -> None:
    rgb8 = photo("astronaut")
    noise = np.random.default_rng(1).integers(-128, 129, rgb8.shape)
    rgb16 = np.clip(rgb8.astype(np.int64) * 257 + noise, 0, 65535).astype(np.uint16)
    expected = np.rint(rgb16 / 257).astype(np.uint8)
    _, rgb_png = cv2.imencode(".png", rgb16[..., ::-1])
    assert np.array_equal(decode(rgb_png.tobytes()).rgb, expected)
    grey16 = rgb16[..., 1]
    grey_png = encoded(Image.fromarray(grey16), "PNG")
    assert Image.open(io.BytesIO(grey_png)).mode.startswith("I;16")
    assert np.array_equal(decode(grey_png).rgb, np.dstack([expected[..., 1]] * 3))
    assert np.array_equal(decode(encoded(Image.fromarray(grey16), "TIFF")).rgb, np.dstack([expected[..., 1]] * 3))
    alpha16 = np.full(rgb16.shape[:2], 65535, np.uint16)
    alpha16[:, :100] = 0
    _, rgba_png = cv2.imencode(".png", np.dstack([rgb16[..., ::-1], alpha16]))
    result = decode(rgba_png.tobytes(), background=(0, 0, 255))
    assert np.array_equal(result.rgb[:, 100:], expected[:, 100:])
    assert (result.rgb[:, :100] == (0, 0, 255)).all()


def test_cmyk_jpeg_matches_pillow() -> None:
    cmyk = Image.fromarray(photo("rocket")).convert("CMYK")
    data = encoded(cmyk, "JPEG", quality=95)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    result = decode(data)
    assert result.format == "JPEG" and np.abs(result.rgb.astype(int) - reference).max() <= 1
    assert np.abs(result.rgb.astype(int) - photo("rocket")).mean() < 3  # and it still is the photo


@pytest.mark.parametrize("variant", [{}, {"progressive": True}, {"subsampling": 0}, {"grey": True}])
def test_jpeg_variants_match_pillow(variant: dict[str, bool]) -> None:
    im = Image.fromarray(photo("china"))
    im = im.convert("L") if variant.pop("grey", False) else im
    data = encoded(im, "JPEG", quality=90, **variant)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    assert np.abs(decode(data).rgb.astype(int) - reference).mean() < 0.5


@pytest.mark.parametrize(
    ("fmt", "kwargs"),
    [
        ("WEBP", {"lossless": True}),
        ("BMP", {}),
        ("TIFF", {}),
        ("TIFF", {"compression": "tiff_lzw"}),
        ("TIFF", {"compression": "tiff_adobe_deflate"}),
        ("GIF", {}),
    ],
)
def test_other_formats_decode_exactly(fmt: str, kwargs: dict[str, object]) -> None:
    im = Image.fromarray(photo("motorcycle_left"))
    if fmt == "GIF":
        im = im.convert("P")
    result = decode(encoded(im, fmt, **kwargs))
    assert result.format == fmt
    assert np.array_equal(result.rgb, np.asarray(im.convert("RGB")))


def test_lossy_webp_matches_pillow() -> None:
    data = encoded(Image.fromarray(alpha_ramp(photo("coffee"))), "WEBP", quality=80)
    reference = composite(np.asarray(Image.open(io.BytesIO(data)).convert("RGBA")), (0, 0, 0)).astype(int)
    assert np.abs(decode(data).rgb.astype(int) - reference).max() <= 1


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animations_give_their_first_frame(fmt: str) -> None:
    first, second = photo("astronaut")[:256, :256], photo("coffee")[:256, :256]
    frames = [Image.fromarray(first), Image.fromarray(second)]
    if fmt == "GIF":
        frames = [frame.convert("P") for frame in frames]
    kwargs: dict[str, object] = {"lossless": True} if fmt == "WEBP" else {}
    data = encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, **kwargs)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2  # only animated formats define it
    assert np.array_equal(decode(data).rgb, np.asarray(frames[0].convert("RGB")))


def test_apng_with_a_hidden_default_image_gives_the_default_image() -> None:
    default, frame = photo("chelsea")[:200, :200], photo("rocket")[:200, :200]
    data = encoded(
        Image.fromarray(default), "PNG", save_all=True, default_image=True, append_images=[Image.fromarray(frame)] * 2
    )
    assert np.array_equal(decode(data).rgb, default)


def test_multipage_tiff_gives_its_first_page() -> None:
    pages = [Image.fromarray(photo("flower")), Image.fromarray(photo("china"))]
    data = encoded(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    assert np.array_equal(decode(data).rgb, photo("flower"))


# --- reduced JPEG decoding ------------------------------------------------------------------------


@functools.cache
def large_jpeg() -> bytes:
    """A 1600x1064 JPEG made from a real photo."""
    return encoded(Image.fromarray(cv2.resize(photo("china"), (1600, 1064), interpolation=cv2.INTER_CUBIC)), "JPEG")


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ((832, 480), (1600, 1064)),
        ((800, 532), (800, 532)),
        ((400, 266), (400, 266)),
        ((300, 200), (400, 266)),
        ((100, 60), (200, 133)),
    ],
)
def test_reduce_to_decodes_jpeg_at_the_smallest_covering_scale(
    target: tuple[int, int], expected: tuple[int, int]
) -> None:
    result = decode(large_jpeg(), reduce_to=target)
    assert (result.rgb.shape[1], result.rgb.shape[0]) == expected
    assert result.source_size == (1600, 1064)
    full = decode(large_jpeg()).rgb
    area = cv2.resize(full, expected, interpolation=cv2.INTER_AREA)
    assert np.abs(result.rgb.astype(int) - area).mean() < 4


def test_reduce_to_respects_orientation_and_leaves_other_formats_alone() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    with Image.open(io.BytesIO(large_jpeg())) as im:
        rotated = encoded(im, "JPEG", exif=exif.tobytes())
    result = decode(rotated, reduce_to=(532, 800))  # upright, the image is 1064 wide and 1600 high
    assert result.rgb.shape[:2] == (800, 532) and result.source_size == (1064, 1600)
    png = encoded(Image.fromarray(photo("motorcycle_left")), "PNG")
    assert decode(png, reduce_to=(100, 100)).rgb.shape == photo("motorcycle_left").shape


# --- text chunks ----------------------------------------------------------------------------------


def comfyui_png(**extra: str) -> tuple[bytes, dict[str, str]]:
    info = PngImagePlugin.PngInfo()
    text = {
        "prompt": json.dumps({"3": {"class_type": "KSampler", "inputs": {"seed": 42}}}),
        "workflow": json.dumps({"nodes": [{"id": n, "type": "KSampler"} for n in range(200)]}),
    }
    for key, value in text.items():
        info.add_text(key, value)
    info.add_text("zipped", "compressed " * 100, zip=True)
    info.add_itxt("caption", "猫 in the rain ☔")
    info.add_itxt("zipped caption", "ünïcödé " * 50, zip=True)
    text.update({"zipped": "compressed " * 100, "caption": "猫 in the rain ☔", "zipped caption": "ünïcödé " * 50})
    return encoded(Image.fromarray(photo("astronaut")), "PNG", pnginfo=info, compress_level=4), text


def test_png_text_chunks_are_read_like_comfyui_writes_them() -> None:
    data, expected = comfyui_png()
    result = decode(data)
    assert dict(result.text) == expected
    pillow = Image.open(io.BytesIO(data))
    assert isinstance(pillow, PngImagePlugin.PngImageFile)
    assert dict(pillow.text) == expected  # the same reading as Pillow's


def test_text_chunks_after_the_image_data_are_read() -> None:
    data, expected = comfyui_png()
    iend = data.rindex(b"IEND") - 4
    late = data[:iend] + chunk(b"tEXt", b"late\0after IDAT") + data[iend:]
    assert decode(late).text == {**expected, "late": "after IDAT"}


@functools.cache
def zipped_zeros() -> bytes:
    """128 MiB of zeros, deflated to about 128 KiB."""
    deflater = zlib.compressobj(9)
    block = bytes(1 << 20)
    return b"".join(deflater.compress(block) for _ in range(128)) + deflater.flush()


@pytest.mark.parametrize("kind", [b"zTXt", b"iTXt"])
def test_a_zip_bomb_text_chunk_is_dropped_without_blowing_memory(kind: bytes) -> None:
    bomb = zipped_zeros()
    body = b"bomb\0\0" + bomb if kind == b"zTXt" else b"bomb\0\1\0\0\0" + bomb
    data, expected = comfyui_png()
    ihdr_end = 33
    data = data[:ihdr_end] + chunk(kind, body) + data[ihdr_end:]
    tracemalloc.start()
    try:
        result = decode(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.text == expected
    assert result.text_left_out == ("bomb",)
    assert peak < 3 * TEXT_VALUE_LIMIT + 8 * 2**20


def test_text_is_capped_per_value_and_in_total() -> None:
    value = "x" * (TEXT_TOTAL_LIMIT // 3)
    extra = b"".join(chunk(b"tEXt", f"k{n}".encode() + b"\0" + value.encode()) for n in range(4))
    extra += chunk(b"tEXt", b"huge\0" + b"y" * (TEXT_VALUE_LIMIT + 1))
    rgb = small("astronaut")
    decoded = decode(handmade_png(64, 48, 8, 2, scanlines(rgb), extra=extra))
    assert set(decoded.text) == {"k0", "k1", "k2"} and sum(map(len, decoded.text.values())) <= TEXT_TOTAL_LIMIT
    assert decoded.text_left_out == ("k3", "huge")


def test_a_text_chunk_larger_than_all_text_together_is_named_without_being_read() -> None:
    extra = chunk(b"tEXt", b"workflow\0" + b"z" * (TEXT_TOTAL_LIMIT + 1)) + chunk(b"tEXt", b"prompt\0{}")
    decoded = decode(handmade_png(64, 48, 8, 2, scanlines(small("astronaut")), extra=extra))
    assert decoded.text == {"prompt": "{}"}
    assert decoded.text_left_out == ("workflow",)


def test_text_the_encoder_could_not_write_back_is_dropped() -> None:
    extra = (
        chunk(b"tEXt", b"k" * 80 + b"\0too long a keyword")
        + chunk(b"tEXt", b"nul\0a\0b")
        + chunk(b"iTXt", b"bad utf8\0\0\0\0\0\xff\xfe")
        + chunk(b"zTXt", b"broken\0\0not zlib")
        + chunk(b"tEXt", b"kept\0value")
    )
    decoded = decode(handmade_png(64, 48, 8, 2, scanlines(small("astronaut")), extra=extra))
    assert decoded.text == {"kept": "value"}
    assert decoded.text_left_out == (), "unreadable text is not text too large to keep"
    assert encode_png(small("astronaut"), text=decoded.text)  # what decode keeps, encode can write


# --- bad inputs -----------------------------------------------------------------------------------


def test_empty_input_is_a_retry_whose_reason_is_empty(tmp_path: Path) -> None:
    with pytest.raises(IncompleteImage) as raised:
        decode(b"")
    assert raised.value.reason == "empty" and raised.value.path == "watch/source.img"
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(IncompleteImage, match="empty") as raised:
        decode_file(tmp_path / "empty.png", max_bytes=BIG, max_pixels=BIG)
    assert raised.value.reason == "empty" and raised.value.path == str(tmp_path / "empty.png")


@pytest.mark.parametrize(
    "data",
    [
        b"hello, this is a text file\n" * 40,
        os.urandom(0) + np.random.default_rng(7).bytes(5000),
        b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n" * 20,
        b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(40),
        b"BMW and Audi are cars, this is a note about them.\n",
        b'{"prompt": {}}',
    ],
    ids=["text", "random", "pdf", "wav", "text-starting-BM", "json"],
)
def test_non_images_are_not_image(data: bytes) -> None:
    with pytest.raises(UnsupportedImage) as raised:
        decode(data)
    assert raised.value.reason == "not_image" and raised.value.path == "watch/source.img"


@pytest.mark.parametrize("fmt", ["PPM", "ICO", "PCX", "QOI", "JPEG2000"])
def test_image_formats_we_do_not_read_are_unsupported(fmt: str) -> None:
    with pytest.raises(UnsupportedImage, match=fmt) as raised:
        decode(encoded(Image.fromarray(small("coffee")), fmt))
    assert raised.value.reason == "unsupported"


@pytest.mark.parametrize("mode", ["F", "I"])
def test_image_modes_we_do_not_read_are_unsupported(mode: str) -> None:
    with pytest.raises(UnsupportedImage, match=f"mode {mode}") as raised:
        decode(encoded(Image.fromarray(small("coffee")).convert(mode), "TIFF"))
    assert raised.value.reason == "unsupported"


def test_over_max_bytes_is_refused_before_reading(tmp_path: Path) -> None:
    sparse = tmp_path / "huge.png"
    with sparse.open("wb") as file:
        file.write(photo_file("astronaut").read_bytes())
        file.truncate(8 << 30)  # 8 GiB, sparse: reading it would take all the memory there is
    with pytest.raises(ImageTooLarge) as raised:
        decode_file(sparse, max_bytes=1 << 20, max_pixels=BIG)
    assert raised.value.reason == "too_large" and raised.value.path == str(sparse)


def bomb_inputs() -> dict[str, bytes]:
    """Headers claiming more pixels than the limit (10**7 in the test), every format, valid checksums.

    9000 x 9000 stays under Pillow's own limit, so that our check is the one that fires.
    """
    rgb = small("astronaut")
    jpeg = bytearray(encoded(Image.fromarray(rgb), "JPEG"))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", 9000, 9000)
    huge_jpeg = bytearray(jpeg)
    huge_jpeg[sof + 5 : sof + 9] = struct.pack(">HH", 60_000, 60_000)  # over Pillow's limit too
    webp = bytearray(encoded(Image.fromarray(rgb), "WEBP", lossless=True))
    webp[21:25] = struct.pack("<I", (0x3FFF | 0x3FFF << 14) | (int.from_bytes(webp[21:25], "little") & ~0xFFFFFFF))
    anim = bytearray(encoded(Image.fromarray(rgb), "WEBP", save_all=True, append_images=[Image.fromarray(rgb[::-1])]))
    anim[24:30] = (8999).to_bytes(3, "little") * 2
    gif = bytearray(encoded(Image.fromarray(rgb).convert("P"), "GIF"))
    gif[6:10] = struct.pack("<HH", 9000, 9000)
    bmp = bytearray(encoded(Image.fromarray(rgb), "BMP"))
    bmp[18:26] = struct.pack("<ii", 9000, 9000)
    return {
        "png": handmade_png(100_000, 100_000, 8, 2, scanlines(rgb)),
        "jpeg": bytes(jpeg),
        "jpeg-over-pillow-limit": bytes(huge_jpeg),
        "webp": bytes(webp),
        "animated-webp": bytes(anim),
        "gif": bytes(gif),
        "bmp": bytes(bmp),
    }


@pytest.mark.parametrize("name", sorted(bomb_inputs()))
def test_bombs_are_refused_from_the_header_before_any_pixel_is_decoded(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused = refused_as_bomb(lambda: decode(bomb_inputs()[name], max_pixels=10**7), monkeypatch)
    assert refused.path == "watch/source.img"


def refused_as_bomb(decoding: Callable[[], object], monkeypatch: pytest.MonkeyPatch) -> ImageTooLarge:
    """The bomb error `decoding` raises, checked to come before any decoder ran and with under 4 MB allocated."""
    calls: list[str] = []
    monkeypatch.setattr(cv2, "imdecode", lambda *args: calls.append("cv2.imdecode"))
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: calls.append("Pillow load"))
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLarge) as raised:
            decoding()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert raised.value.reason == "bomb"
    assert calls == [] and peak < 4 * 2**20
    return raised.value


def test_a_100000_squared_png_is_refused_with_memory_capped(tmp_path: Path) -> None:
    """In a child whose address space cannot hold even one such frame (30 GB): refused, RSS flat."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_inputs()["png"])
    script = (
        "import resource, sys\n"
        "from service.decode import decode_file\n"
        "from service.errors import ImageTooLarge\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_AS)\n"
        "used = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
        "resource.setrlimit(resource.RLIMIT_AS, (used + (1 << 30), hard))\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    decode_file(sys.argv[1], max_bytes=1 << 28, max_pixels=10**8)\n"
        "except ImageTooLarge as exc:\n"
        "    print(exc.reason, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", script, str(bomb)], cwd=root, capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    assert out[0] == "bomb" and int(out[1]) < 16 * 1024  # ru_maxrss grows by less than 16 MiB


@pytest.mark.parametrize(("width", "height"), [(0, 48), (64, 0)])
def test_zero_dimensions_are_corrupt(width: int, height: int) -> None:
    with pytest.raises(CorruptImage):
        decode(handmade_png(width, height, 8, 2, b"\0"))


# --- truncation: a file still being written is a retry, never a result --------------------------


@functools.cache
def small_files(height: int = 48, width: int = 64) -> dict[str, bytes]:
    im = Image.fromarray(small("chelsea")[:height, :width])
    return {
        "PNG": encoded(im, "PNG"),
        "JPEG": encoded(im, "JPEG", exif=Image.Exif().tobytes()),
        "progressive JPEG": encoded(im, "JPEG", progressive=True),
        "WEBP": encoded(im, "WEBP", quality=80),
        "GIF": encoded(im.convert("P"), "GIF"),
        "BMP": encoded(im, "BMP"),
        "TIFF": encoded(im, "TIFF"),
    }


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "progressive JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_a_file_cut_at_any_byte_is_incomplete(fmt: str) -> None:
    data = small_files(24, 32)[fmt]
    assert decode(data).rgb.shape == (24, 32, 3)
    for cut in range(1, len(data)):
        with pytest.raises(IncompleteImage) as raised:
            decode(data[:cut])
        assert raised.value.transient and raised.value.reason == "incomplete", cut


@pytest.mark.parametrize("name", ["astronaut", "coffee", "rocket", "china"])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_real_photo_files_cut_short_are_incomplete(name: str, fmt: str) -> None:
    data = encoded(Image.fromarray(photo(name)), fmt)
    for fraction in (0.001, 0.1, 0.5, 0.9, 0.999):
        with pytest.raises(IncompleteImage):
            decode(data[: int(len(data) * fraction)])
    tail = {"PNG": 12, "JPEG": 2, "WEBP": 1}[fmt]  # PNG without IEND, JPEG without EOI, WebP one byte short
    with pytest.raises(IncompleteImage):
        decode(data[:-tail])


# --- damage in a complete file ------------------------------------------------------------------


def test_damaged_pngs_are_corrupt() -> None:
    rgb = small("rocket")
    good = handmade_png(64, 48, 8, 2, scanlines(rgb))
    flipped = bytearray(good)
    flipped[60] ^= 0x40  # inside IDAT: the CRC catches it
    idat_garbage = handmade_png(64, 48, 8, 2, b"")[:33] + chunk(b"IDAT", b"x\x9c" + bytes(range(256)) * 8)
    idat_garbage += chunk(b"IEND", b"")
    short_stream = handmade_png(64, 48, 8, 2, scanlines(rgb[:24]))  # valid zlib, half the rows: no black rows
    bad_depth = handmade_png(64, 48, 5, 2, scanlines(rgb))
    no_ihdr = b"\x89PNG\r\n\x1a\n" + chunk(b"tEXt", b"a\0b") + good[8:]
    no_idat = good[:33] + chunk(b"IEND", b"")
    for data in (bytes(flipped), idat_garbage, short_stream, bad_depth, no_ihdr, no_idat):
        with pytest.raises(CorruptImage) as raised:
            decode(data)
        assert raised.value.reason == "corrupt" and raised.value.path == "watch/source.img"


def test_damaged_containers_of_other_formats_are_corrupt() -> None:
    jpeg_without_frame = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xd9"
    gif = bytearray(small_files()["GIF"])
    gif[gif.index(b",")] = 0x77  # the image descriptor's introducer
    webp = bytearray(small_files()["WEBP"])
    webp[16:20] = struct.pack("<I", 1 << 30)  # a chunk longer than the file says it is
    for data in (jpeg_without_frame, bytes(gif), bytes(webp)):
        with pytest.raises(CorruptImage):
            decode(data)


MUTATION = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=4)),
    st.tuples(st.just("set"), st.integers(0, 80), st.binary(min_size=1, max_size=4)),
    st.tuples(st.just("cut"), st.integers(0, 1 << 20), st.just(b"")),
    st.tuples(st.just("delete"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=32)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(sorted(small_files())), mutations=st.lists(MUTATION, min_size=1, max_size=4))
def test_mutated_files_give_pixels_or_an_input_error(fmt: str, mutations: list[tuple[str, int, bytes]]) -> None:
    data = bytearray(small_files()[fmt])
    for op, at, payload in mutations:
        at %= len(data) + 1
        if op == "set":
            data[at : at + len(payload)] = payload[: max(0, len(data) - at)]
        elif op == "cut":
            del data[at:]
        elif op == "delete":
            del data[at : at + len(payload)]
        else:
            data[at:at] = payload
    try:
        result = decode(bytes(data), max_pixels=64 * 48 * 16)
    except InputError as exc:
        assert isinstance(exc, INPUT_ERRORS) and exc.path == "watch/source.img" and exc.stage == "decode"
        return
    assert result.rgb.dtype == np.uint8 and result.rgb.ndim == 3 and result.rgb.shape[2] == 3
    assert result.rgb.flags.c_contiguous and result.rgb.size > 0


# --- the file edge --------------------------------------------------------------------------------


# inotify(7) event bits and the fixed part of an event (wd, mask, cookie, len; then `len` bytes of name).
IN_ACCESS, IN_CLOSE_NOWRITE, IN_OPEN = 0x1, 0x10, 0x20
INOTIFY_EVENT = struct.Struct("iIII")


def file_events(path: Path, action: Callable[[], T]) -> tuple[T, dict[str, int]]:
    """What `action` returns, and how often `path` was opened and read meanwhile: {"opens": n, "reads": n}.

    inotify sees every open(2) and read(2) of the file, whoever makes it: open(), pathlib, os.open or C code.
    Closes are watched as well only so that two opens in a row are two events (the kernel merges identical
    consecutive unread events).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1")
    try:
        if libc.inotify_add_watch(fd, os.fsencode(path), IN_OPEN | IN_ACCESS | IN_CLOSE_NOWRITE) < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
        result = action()
        events = b""
        while True:  # the events of a finished action are all queued already: read until none is left
            try:
                events += os.read(fd, 1 << 16)
            except BlockingIOError:
                break
    finally:
        os.close(fd)
    counts = {"opens": 0, "reads": 0}
    offset = 0
    while offset < len(events):
        _wd, mask, _cookie, name_length = INOTIFY_EVENT.unpack_from(events, offset)
        offset += INOTIFY_EVENT.size + name_length
        counts["opens"] += bool(mask & IN_OPEN)
        counts["reads"] += bool(mask & IN_ACCESS)
    return result, counts


def test_decode_file_reads_once_and_hashes_the_decoded_bytes(tmp_path: Path) -> None:
    data, _ = comfyui_png()
    path = tmp_path / "ComfyUI_00001_.png"
    path.write_bytes(data)
    result, seen = file_events(path, lambda: decode_file(path, max_bytes=len(data), max_pixels=BIG))
    assert result.sha256 == hashlib.sha256(data).hexdigest() and result.text["prompt"].startswith("{")
    # A second read could see another file (a generator rewriting it): the hash would not be of these pixels.
    assert seen["opens"] == 1, f"the source was opened {seen['opens']} times"
    assert seen["reads"] >= 1, "inotify saw no read: the check below would say nothing"

    def too_large() -> None:
        with pytest.raises(ImageTooLarge):
            decode_file(path, max_bytes=len(data) - 1, max_pixels=BIG)

    _, seen = file_events(path, too_large)
    assert seen["reads"] == 0, "a source over max_bytes was read before it was refused"


def test_decode_file_unreadable_sources(tmp_path: Path) -> None:
    with pytest.raises(IncompleteImage) as raised:
        decode_file(tmp_path / "gone.png", max_bytes=BIG, max_pixels=BIG)
    assert raised.value.transient and raised.value.path == str(tmp_path / "gone.png")
    os.mkfifo(tmp_path / "pipe.png")  # open() on a FIFO without a writer would block forever
    with pytest.raises(UnsupportedImage) as refused:
        decode_file(tmp_path / "pipe.png", max_bytes=BIG, max_pixels=BIG)
    assert refused.value.reason == "not_image"
    with pytest.raises(UnsupportedImage):
        decode_file(tmp_path, max_bytes=BIG, max_pixels=BIG)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"background": (0, 0)}, "background"),
        ({"background": (0, 0, 256)}, "background"),
        ({"reduce_to": (0, 10)}, "reduce_to"),
    ],
)
def test_bad_parameters_name_themselves(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        decode(small_files()["PNG"], **kwargs)
