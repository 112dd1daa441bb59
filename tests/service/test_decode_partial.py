"""service.decode on files still being written: preallocated to their final size (zeros where not yet
written), sparse with a hole to their end, multipage or with an image appended. Each is a retry
(IncompleteImage), never a result nor a rejection; complete, they decode as before."""

from __future__ import annotations

import functools
import io
import os
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin, TiffImagePlugin

from service.decode import decode_bytes, decode_file
from service.errors import CorruptImage, IncompleteImage
from tests.conftest import load_photo
from tests.service.test_decode import refused_as_bomb

BIG = 10**8
CUTS = (0.02, 0.25, 0.5, 0.75, 0.9)  # how much of the file is written


@functools.cache
def photo() -> np.ndarray:
    return load_photo("astronaut")


def encoded(im: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    im.save(out, format=fmt, **options)
    return out.getvalue()


def _png_with_workflow() -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("workflow", "".join(f'{{"node": {i}, "widgets": [{i * 7}, "euler"]}}' for i in range(3000)))
    return encoded(Image.fromarray(photo()), "PNG", pnginfo=info)


def _multipage_tiff() -> bytes:
    pages = [Image.fromarray(photo()), Image.fromarray(photo()[::-1].copy())]
    return encoded(pages[0], "TIFF", save_all=True, append_images=pages[1:])


def _animated_gif() -> bytes:
    frames = [Image.fromarray(photo()[::2, ::2]).convert("P"), Image.fromarray(photo()[1::2, 1::2]).convert("P")]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])


MAKERS: dict[str, Callable[[], bytes]] = {
    "png": lambda: encoded(Image.fromarray(photo()), "PNG"),
    "png-with-workflow-text": _png_with_workflow,
    "gif-animated": _animated_gif,
    "tiff-lzw": lambda: encoded(Image.fromarray(photo()), "TIFF", compression="tiff_lzw"),
    "tiff-multipage": _multipage_tiff,
    "webp-lossy": lambda: encoded(Image.fromarray(photo()), "WEBP", quality=90),
    "webp-lossless": lambda: encoded(Image.fromarray(photo()), "WEBP", lossless=True),
    "webp-lossy-exif": lambda: encoded(Image.fromarray(photo()), "WEBP", quality=75, exif=_exif_orientation(6)),
}


def _exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


@functools.cache
def made(name: str) -> bytes:
    return MAKERS[name]()


def preallocated(data: bytes, written: float) -> bytes:
    cut = int(len(data) * written)
    return data[:cut] + bytes(len(data) - cut)


def decode(data: bytes, **options: object) -> np.ndarray:
    options.setdefault("max_pixels", BIG)
    return decode_bytes(data, path="watch/source.img", **options).rgb  # type: ignore[arg-type]


# Pillow writes each page's directory before its strips: zeros in the second page's (uncompressed) strips
# break nothing, so the multipage file is cut in its first page only. A lossy WebP may end in 16 zero bytes
# per macroblock (WEBP_LOSSY_ZERO_TAIL), here 16 KiB of its 52: its last quarter being filled goes unseen. A
# lossless one may end in any number of zeros: only a hole at its end tells it is being filled.
PREALLOCATED = [
    (n, w)
    for n in sorted(MAKERS)
    for w in CUTS
    if (w < 0.45 or (n != "tiff-multipage" and not n.startswith("webp-lossy"))) and n != "webp-lossless"
]


@pytest.mark.parametrize(("name", "written"), PREALLOCATED)
def test_a_preallocated_file_being_filled_is_incomplete(name: str, written: float) -> None:
    with pytest.raises(IncompleteImage) as raised:
        decode(preallocated(made(name), written))
    assert raised.value.transient


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_the_complete_files_decode_to_pillows_pixels(name: str) -> None:
    data = made(name)
    with Image.open(io.BytesIO(data)) as im:
        expected = np.asarray(im.convert("RGB"))
    rgb = decode(data)
    if name == "webp-lossy-exif":
        rgb = np.rot90(rgb, 1)  # orientation 6: turned upright, a quarter turn clockwise
    # libwebp through OpenCV and through Pillow may round lossy chroma differently; the rest is exact.
    tolerance = 2 if name.startswith("webp-lossy") else 0
    assert rgb.shape == expected.shape
    assert np.abs(rgb.astype(int) - expected).max() <= tolerance


@pytest.mark.parametrize("name", ["png", "gif-animated"])
def test_a_break_followed_by_other_bytes_than_zeros_stays_corrupt(name: str) -> None:
    data = preallocated(made(name), 0.5)
    damaged = data[:-1] + b"\x01"  # the zeros do not run to the end: not a file being filled
    with pytest.raises(CorruptImage):
        decode(damaged)


def test_a_lossless_webp_of_the_fastest_effort_ending_in_a_flat_colour_still_decodes() -> None:
    """Quality 0, method 0 (`cwebp -z 0`): a black lower part ends the complete file in thousands of zeros."""
    rgb = photo().copy()
    rgb[384:] = 0
    data = encoded(Image.fromarray(rgb), "WEBP", lossless=True, quality=0, method=0)
    assert data.endswith(bytes(1024))
    assert np.array_equal(decode(data), rgb)


def test_a_lossy_webp_ending_in_a_flat_colour_still_decodes() -> None:
    """Its last rows code to a long run of zero bytes (~1,400 here), which is not a file being filled."""
    rgb = photo().copy()
    rgb[256:] = 0
    data = encoded(Image.fromarray(rgb), "WEBP", quality=90, method=0)
    assert data.endswith(bytes(512))
    assert decode(data).shape == (512, 512, 3)


# --- file system holes ---------------------------------------------------------------------------


def bmp() -> bytes:
    return encoded(Image.fromarray(photo()), "BMP")


@pytest.mark.parametrize("written", CUTS)
def test_a_sparse_file_with_a_hole_to_its_end_is_incomplete(tmp_path: Path, written: float) -> None:
    """A BMP cannot tell zeros from black pixels: only the file system knows those blocks are unwritten."""
    data, path = bmp(), tmp_path / "gen.bmp"
    with path.open("wb") as file:
        file.truncate(len(data))  # the final size first, as Samba and download managers do
        file.write(data[: int(len(data) * written)])
    with pytest.raises(IncompleteImage) as raised:
        decode_file(path, max_bytes=1 << 30, max_pixels=BIG)
    assert "unwritten blocks at its end" in raised.value.message


@pytest.mark.parametrize("how", ["written", "fsynced", "preallocated then filled", "hole in the middle"])
def test_files_without_a_hole_at_their_end_decode(tmp_path: Path, how: str) -> None:
    data, path = bmp(), tmp_path / "gen.bmp"
    middle = len(data) // 2 // 8192 * 8192
    if how == "hole in the middle":  # zero pixels stored sparse: nothing is still being written
        data = data[:middle] + bytes(65536) + data[middle + 65536 :]
    with path.open("wb") as file:
        if how == "preallocated then filled":
            file.truncate(len(data))
        if how == "hole in the middle":
            file.write(data[:middle])
            file.seek(middle + 65536)
            file.write(data[middle + 65536 :])
        else:
            file.write(data)
        if how == "fsynced":
            file.flush()
            os.fsync(file.fileno())
    expected = decode(data)
    assert np.array_equal(decode_file(path, max_bytes=1 << 30, max_pixels=BIG).rgb, expected)


# --- more than one image in the file -------------------------------------------------------------


def test_a_multipage_tiff_cut_after_its_first_page_is_incomplete() -> None:
    data = made("tiff-multipage")
    with Image.open(io.BytesIO(data)) as im:
        assert isinstance(im, TiffImagePlugin.TiffImageFile)
        im.seek(1)
        second_directory = im.tag_v2.offset
    assert second_directory is not None
    for cut in (second_directory, second_directory + 1):
        with pytest.raises(IncompleteImage, match="second page"):
            decode(data[:cut])


@functools.cache
def ultra_hdr() -> tuple[bytes, bytes]:
    """A primary JPEG and a grey gain map appended after its EOI, as Ultra HDR (and MPF) files hold them."""
    primary = encoded(Image.fromarray(photo()), "JPEG", quality=90)
    return primary, encoded(Image.fromarray(photo()[::4, ::4]).convert("L"), "JPEG")


@pytest.mark.parametrize("inside", [3, 0.1, 0.5, 0.99])
def test_a_jpeg_cut_inside_its_appended_image_is_incomplete(inside: float) -> None:
    primary, gain_map = ultra_hdr()
    cut = len(primary) + (inside if isinstance(inside, int) else int(len(gain_map) * inside))
    with pytest.raises(IncompleteImage):
        decode((primary + gain_map)[:cut])


@pytest.mark.parametrize("after", [b"", b"GAINMAP", b"\xff\xd8\x00garbage", bytes(64)])
def test_a_jpeg_with_a_complete_appended_image_or_trailing_bytes_decodes(after: bytes) -> None:
    primary, gain_map = ultra_hdr()
    assert np.array_equal(decode(primary + gain_map + after), decode(primary))
    assert np.array_equal(decode(primary + after), decode(primary))


# --- headers over Pillow's own limit --------------------------------------------------------------


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header claims width x height; its scan names a component the frame
    lacks, so a decoder fails before writing a row (the test allocates nothing)."""
    data = bytearray(encoded(Image.fromarray(photo()[:64, :64]), "JPEG"))
    sof, sos = data.index(b"\xff\xc0"), data.index(b"\xff\xda")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    data[sos + 5] = 0x77
    return bytes(data)


def test_a_raised_max_pixels_holds_above_pillows_own_limit() -> None:
    """195 M pixels, over Pillow's 178,956,970: with max_pixels at 300 M it is decoded (and found damaged)."""
    with pytest.raises(CorruptImage, match="cannot be decoded") as raised:
        decode(jpeg_claiming(15_000, 13_000), max_pixels=300_000_000)
    assert "exceeds limit" not in raised.value.message  # Pillow's words


def test_the_default_limit_still_refuses_it_before_any_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    refused = refused_as_bomb(lambda: decode(jpeg_claiming(15_000, 13_000), max_pixels=100_000_000), monkeypatch)
    assert "Pillow" not in refused.message


def test_a_webp_being_filled_in_its_metadata_is_incomplete() -> None:
    """The image is complete but its EXIF is not: published now, it would lose its orientation."""
    xmp = b"<x:xmpmeta xmlns:x='adobe:ns:meta/'/>"
    data = encoded(Image.fromarray(photo()), "WEBP", quality=75, exif=_exif_orientation(6), xmp=xmp)
    exif = data.index(b"EXIF")
    with pytest.raises(IncompleteImage, match="no name"):
        decode(data[: exif + 12] + bytes(len(data) - exif - 12))


def test_a_file_that_grows_while_it_is_read_is_incomplete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(encoded(Image.fromarray(photo()), "PNG"))
    real_fstat = os.fstat

    def fstat_then_append(fd: int) -> os.stat_result:
        st = real_fstat(fd)
        with path.open("ab") as more:  # the writer goes on meanwhile
            more.write(b"\x89PNG more bytes")
        return st

    monkeypatch.setattr(os, "fstat", fstat_then_append)
    with pytest.raises(IncompleteImage, match="changed size while it was read"):
        decode_file(path, max_bytes=1 << 26, max_pixels=1 << 26)
