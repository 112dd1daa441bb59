"""service.decode with libspng (`pyspng`, the `fast` extra): which PNGs it gets, what it sees, and that
every file gives the same pixels or the same error as with OpenCV alone."""

from __future__ import annotations

import functools
import importlib.util
import io
import random
import struct
import sys
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from service import decode
from service.errors import CorruptImage, InputError
from tests.conftest import fast_extra, load_photo

SIGNATURE = b"\x89PNG\r\n\x1a\n"
COMFY_TEXT = {"prompt": '{"3": {"class_type": "KSampler", "inputs": {"seed": 7}}}', "workflow": '{"nodes": []}'}


@dataclass
class Spy:
    """Stands in for pyspng: records each stream it is given, then decodes it with pyspng or fails."""

    load_with: Callable[[bytes, str], np.ndarray] | None
    streams: list[bytes] = field(default_factory=list)

    def load(self, data: bytes, fmt: str) -> np.ndarray:
        self.streams.append(data)
        if self.load_with is None:
            raise RuntimeError("pyspng: could not decode image: stand-in failure")
        return self.load_with(data, fmt)


@pytest.fixture
def libspng(monkeypatch: pytest.MonkeyPatch) -> Spy:
    """pyspng in use, spied on."""
    pyspng = fast_extra("pyspng")
    spy = Spy(pyspng.load)
    monkeypatch.setattr(decode, "_spng", spy)
    monkeypatch.setattr(decode, "PNG_DECODER", "pyspng")
    return spy


def decoded_with(decoder: str, data: bytes, monkeypatch: pytest.MonkeyPatch) -> np.ndarray | str:
    """The pixels `decoder` gives for `data`, or the name of the error and its reason."""
    monkeypatch.setattr(decode, "PNG_DECODER", decoder)
    try:
        return decode.decode_bytes(data, path="watch/source.png", max_pixels=10**8).rgb
    except InputError as exc:
        return f"{type(exc).__name__}:{exc.reason}"


def comfyui_png(rgb: np.ndarray, **options: object) -> bytes:
    """Saved the way ComfyUI's SaveImage saves: Pillow, compress level 4, prompt and workflow text."""
    info = PngImagePlugin.PngInfo()
    for key, value in COMFY_TEXT.items():
        info.add_text(key, value)
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="PNG", compress_level=4, pnginfo=info, **options)
    return out.getvalue()


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def chunk_list(png: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk after the signature."""
    assert png[:8] == SIGNATURE
    found, pos = [], 8
    while pos < len(png):
        length = int.from_bytes(png[pos : pos + 4], "big")
        found.append((png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return found


def rebuilt(png: bytes, edit: Callable[[list[tuple[bytes, bytes]]], list[tuple[bytes, bytes]]]) -> bytes:
    """`png` with its chunk list edited, every CRC valid."""
    return SIGNATURE + b"".join(chunk(kind, data) for kind, data in edit(chunk_list(png)))


def small(name: str) -> np.ndarray:
    return np.ascontiguousarray(load_photo(name)[100:164, 100:196])


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee", "motorcycle_left", "china"])
def test_generator_pngs_go_to_libspng_and_give_opencvs_pixels(
    name: str, libspng: Spy, monkeypatch: pytest.MonkeyPatch
) -> None:
    rgb = load_photo(name)
    data = comfyui_png(rgb)
    image = decode.decode_bytes(data, path="watch/source.png", max_pixels=10**8)
    assert len(libspng.streams) == 1
    assert np.array_equal(image.rgb, rgb) and image.rgb.flags.c_contiguous and image.text == COMFY_TEXT
    assert np.array_equal(decoded_with("opencv", data, monkeypatch), rgb)
    assert len(libspng.streams) == 1


def test_libspng_sees_only_ihdr_idat_and_iend(libspng: Spy) -> None:
    rgb = small("coffee")
    bomb = zlib.compress(b"a" * (16 << 20), 9)

    def add_ancillary(chunks: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        ihdr, *rest = chunks
        extra = [
            (b"gAMA", struct.pack(">I", 45455)),
            (b"iCCP", b"icc\0\0" + bomb),
            (b"PLTE", bytes(range(6))),
            (b"zTXt", b"bomb\0\0" + bomb),
            (b"prVt", b"private"),
        ]
        return [ihdr, *extra, *rest[:-1], (b"tIME", bytes(7)), rest[-1]]

    data = rebuilt(comfyui_png(rgb), add_ancillary)
    image = decode.decode_bytes(data, path="watch/source.png", max_pixels=10**8)
    assert np.array_equal(image.rgb, rgb) and image.text == COMFY_TEXT  # the bomb is dropped by the walk
    (stream,) = libspng.streams
    kinds = [kind for kind, _ in chunk_list(stream)]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and set(kinds[1:-1]) == {b"IDAT"}
    assert stream == SIGNATURE + b"".join(chunk(k, d) for k, d in chunk_list(data) if k in (b"IHDR", b"IDAT", b"IEND"))


def ihdr_with(data: bytes, **fields: int) -> bytes:
    """`data` with IHDR fields replaced (depth, colour, interlace), the pixel data left as it was."""

    def edit(chunks: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        ihdr = bytearray(chunks[0][1])
        for name, value in fields.items():
            ihdr[{"depth": 8, "colour": 9, "interlace": 12}[name]] = value
        return [(b"IHDR", bytes(ihdr)), *chunks[1:]]

    return rebuilt(data, edit)


@functools.cache
def others() -> dict[str, bytes]:
    """PNGs that are not plain 8-bit RGB, or that libpng would treat differently: OpenCV decodes them."""
    rgb = small("chelsea")
    plain = comfyui_png(rgb)
    anim = io.BytesIO()
    Image.fromarray(rgb).save(anim, format="PNG", save_all=True, append_images=[Image.fromarray(small("rocket"))])
    grey = io.BytesIO()
    Image.fromarray(rgb[..., 1]).save(grey, format="PNG")
    return {
        "rgba": comfyui_png(np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)])),
        "grey": grey.getvalue(),
        "palette": _palette(rgb),
        "16-bit": _rgb16(rgb),
        "colour-key": rebuilt(plain, lambda c: [c[0], (b"tRNS", bytes(6)), *c[1:]]),
        "apng": anim.getvalue(),
        "interlace-flag": ihdr_with(plain, interlace=1),
        "idat-split-by-text": rebuilt(plain, _split_idat),
        "unknown-critical-chunk": rebuilt(plain, lambda c: [c[0], (b"CRIT", b"x"), *c[1:]]),
    }


def _palette(rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).quantize(64).save(out, format="PNG")
    return out.getvalue()


def _rgb16(rgb: np.ndarray) -> bytes:
    rows = (rgb.astype(">u2") * 257).reshape(rgb.shape[0], -1)
    ihdr = struct.pack(">IIBBBBB", rgb.shape[1], rgb.shape[0], 16, 2, 0, 0, 0)
    idat = zlib.compress(b"".join(b"\0" + row.tobytes() for row in rows))
    return SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _split_idat(chunks: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    stream = b"".join(data for kind, data in chunks if kind == b"IDAT")
    ancillary = [(k, d) for k, d in chunks if k not in (b"IHDR", b"IDAT", b"IEND")]
    half = len(stream) // 2
    return [chunks[0], *ancillary, (b"IDAT", stream[:half]), (b"tEXt", b"k\0v"), (b"IDAT", stream[half:]), chunks[-1]]


@pytest.mark.parametrize("name", sorted(others()))
def test_other_pngs_stay_with_opencv(name: str, libspng: Spy, monkeypatch: pytest.MonkeyPatch) -> None:
    data = others()[name]
    with_libspng_installed = decoded_with("pyspng", data, monkeypatch)
    assert libspng.streams == []
    expected = decoded_with("opencv", data, monkeypatch)
    if isinstance(expected, str):
        assert with_libspng_installed == expected
    else:
        assert np.array_equal(with_libspng_installed, expected)


def test_when_libspng_fails_opencv_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Spy(load_with=None)
    monkeypatch.setattr(decode, "_spng", spy)
    rgb = small("astronaut")
    assert np.array_equal(decoded_with("pyspng", comfyui_png(rgb), monkeypatch), rgb)
    assert len(spy.streams) == 1


def test_a_damaged_idat_is_not_given_to_libspng(libspng: Spy) -> None:
    data = bytearray(comfyui_png(small("rocket")))
    data[data.index(b"IDAT") + 40] ^= 0x10  # the pixels' CRC no longer holds; pyspng would not check it
    with pytest.raises(CorruptImage):
        decode.decode_bytes(bytes(data), path="watch/source.png", max_pixels=10**8)
    assert libspng.streams == []


def test_the_opencv_decoder_can_be_chosen(libspng: Spy, monkeypatch: pytest.MonkeyPatch) -> None:
    rgb = small("china")
    assert np.array_equal(decoded_with("opencv", comfyui_png(rgb), monkeypatch), rgb)
    assert libspng.streams == []


def test_without_pyspng_installed_opencv_decodes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyspng", None)  # `import pyspng` now raises ImportError
    spec = importlib.util.spec_from_file_location("decode_without_pyspng", decode.__file__)
    assert spec is not None and spec.loader is not None
    without: ModuleType = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, without)  # dataclasses look their module up there
    spec.loader.exec_module(without)
    assert without.PNG_DECODER == "opencv"
    monkeypatch.setattr(without, "PNG_DECODER", "pyspng")  # asked for, but not installed: still OpenCV
    rgb = small("flower")
    assert np.array_equal(without.decode_bytes(comfyui_png(rgb), path="a.png", max_pixels=10**6).rgb, rgb)


@functools.cache
def generator_png() -> bytes:
    return comfyui_png(small("motorcycle_left"))


def damaged(i: int) -> bytes:
    """A seeded mutation of a real generator PNG: bytes changed as a disk or a cut copy changes them (CRCs
    break), or, every other one, the IHDR or IDAT data changed and the CRCs written anew (a bad encoder)."""
    rng = random.Random(f"libspng-{i}")
    chunks = chunk_list(generator_png())
    if i % 2:
        targets = [n for n, (kind, _) in enumerate(chunks) if kind in (b"IHDR", b"IDAT")]
        for _ in range(rng.randint(1, 3)):
            n = rng.choice(targets)
            chunks[n] = (chunks[n][0], mutated(rng, chunks[n][1], start=0))
        return SIGNATURE + b"".join(chunk(kind, data) for kind, data in chunks)
    data = SIGNATURE + b"".join(chunk(kind, data) for kind, data in chunks)
    for _ in range(rng.randint(1, 3)):
        data = mutated(rng, data, start=8)
    return data


def mutated(rng: random.Random, data: bytes, *, start: int) -> bytes:
    """`data` with one byte flipped or set, a cut, an insert, a deletion or a 4-byte integer written."""
    if len(data) <= start:
        return data
    out = bytearray(data)
    pos = rng.randrange(start, len(out))
    op = rng.choice(("flip", "set", "cut", "insert", "delete", "integer"))
    if op == "flip":
        out[pos] ^= 1 << rng.randrange(8)
    elif op == "set":
        out[pos] = rng.choice((0x00, 0x01, 0x7F, 0x80, 0xFF))
    elif op == "cut":
        del out[pos:]
    elif op == "insert":
        out[pos:pos] = rng.randbytes(rng.randint(1, 16))
    elif op == "delete":
        del out[pos : pos + rng.randint(1, 32)]
    else:
        out[pos : pos + 4] = rng.choice((0, 1, 13, 0xFFFF, 0x7FFFFFFF)).to_bytes(4, "big")
    return bytes(out)


def adler32_fails(data: bytes) -> bool:
    """Whether the zlib stream of a PNG's IDAT chunks ends in a wrong checksum (libpng checks, pyspng not)."""
    stream = b"".join(body for kind, body in chunk_list(data) if kind == b"IDAT")
    try:
        zlib.decompress(stream)
    except zlib.error as exc:
        return "incorrect data check" in str(exc)
    return False


def test_damaged_pngs_give_the_same_pixels_or_error_as_with_opencv_alone(
    libspng: Spy, monkeypatch: pytest.MonkeyPatch
) -> None:
    outcomes: Counter[str] = Counter()
    for i in range(600):
        data = damaged(i)
        before = len(libspng.streams)
        fast = decoded_with("pyspng", data, monkeypatch)
        alone = decoded_with("opencv", data, monkeypatch)
        given = "libspng" if len(libspng.streams) > before else "opencv"
        if isinstance(fast, np.ndarray) and isinstance(alone, np.ndarray):
            assert np.array_equal(fast, alone), i
            outcomes[f"{given}:pixels"] += 1
        elif isinstance(fast, np.ndarray):
            # The one known difference: a CRC-valid stream with a wrong zlib checksum, which only a bad
            # encoder writes; libpng refuses it (and even then, not always), libspng does not check.
            crcs_written_anew = i % 2 == 1
            assert crcs_written_anew and given == "libspng" and alone == "CorruptImage:corrupt", i
            assert adler32_fails(data), i
            outcomes["libspng:pixels, opencv:adler32"] += 1
        else:
            assert fast == alone, (i, fast, alone)
            outcomes[f"{given}:{fast}"] += 1
    assert outcomes["libspng:pixels"] >= 3 and outcomes["libspng:CorruptImage:corrupt"] >= 30, outcomes
    assert outcomes["opencv:CorruptImage:corrupt"] >= 30 and outcomes["opencv:IncompleteImage:incomplete"] >= 30
