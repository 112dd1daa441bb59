"""Source bytes -> upright RGB pixels, with every guard a watch folder needs.

The container is walked before any pixel is decoded. A file cut short (still
being written) raises :class:`IncompleteImage`, a retry: decoders cannot say
it for us (OpenCV just returns nothing, Pillow accepts a PNG without IEND and,
configured as ComfyUI configures it, decodes a cut one with black rows).
Header dimensions over the limit raise :class:`ImageTooLarge` before a decoder
allocates anything. OpenCV decodes PNG (every bit depth and colour type),
grey/YCbCr JPEG and still WebP, the fast path; Pillow decodes CMYK JPEG,
animated WebP, GIF, BMP and TIFF. Every decoder failure maps to an error of
:mod:`service.errors`.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from PIL import Image

from service.errors import CorruptImage, ImageTooLarge, IncompleteImage, InputError, UnsupportedImage

MAX_SIDE = 1 << 20  # OpenCV's own limit per side; nothing longer is a video start frame
TEXT_VALUE_LIMIT = 4 << 20  # characters kept per text chunk (a big ComfyUI workflow is ~1 MB)
TEXT_TOTAL_LIMIT = 8 << 20  # characters kept over all text chunks
_RGB = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_ANYDEPTH | cv2.IMREAD_IGNORE_ORIENTATION
_REDUCED = (
    (8, cv2.IMREAD_REDUCED_GRAYSCALE_8),
    (4, cv2.IMREAD_REDUCED_GRAYSCALE_4),
    (2, cv2.IMREAD_REDUCED_GRAYSCALE_2),
)
# EXIF orientation -> the transform that shows the image upright (as PIL.ImageOps.exif_transpose does).
_UPRIGHT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: cv2.flip(a, 1),
    3: lambda a: cv2.rotate(a, cv2.ROTATE_180),
    4: lambda a: cv2.flip(a, 0),
    5: cv2.transpose,
    6: lambda a: cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE),
    7: lambda a: cv2.flip(cv2.transpose(a), -1),
    8: lambda a: cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE),
}
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),  # BigTIFF
    (b"MM\x00+", "TIFF"),
    (b"RIFF", "WEBP"),
    (b"BM", "BMP"),
)
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # a marker: not a stuffed 0, RSTn or fill
# TIFF field type -> bytes per value
_TIFF_TYPE_SIZES = (
    dict.fromkeys((1, 2, 6, 7), 1)
    | dict.fromkeys((3, 8), 2)
    | dict.fromkeys((4, 9, 11, 13), 4)
    | dict.fromkeys((5, 10, 12, 16, 17, 18), 8)
)
_BMP_HEADER_SIZES = (12, 40, 52, 56, 64, 108, 124)
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_APNG_CHUNKS = (b"acTL", b"fcTL", b"fdAT")


@dataclass(frozen=True, eq=False)  # eq=False: == on arrays has no single truth value
class DecodedImage:
    rgb: np.ndarray  # (H, W, 3) uint8, C-contiguous, upright, alpha composited
    format: str  # "PNG", "JPEG", "WEBP", "GIF", "BMP" or "TIFF"
    source_size: tuple[int, int]  # (width, height) of the full-resolution source, upright
    text: Mapping[str, str]  # PNG text chunks (ComfyUI's "prompt", "workflow"), capped
    sha256: str  # of exactly the bytes decoded


@dataclass
class _Header:
    """What the container walk learnt; `size` None means Pillow's lazy open reads it."""

    format: str
    size: tuple[int, int] | None = None
    cv2_flags: int = 0  # 0: decode with Pillow
    orientation: int = 1
    grey_key: int | None = None  # PNG tRNS colour key of a grey image, as OpenCV returns it
    text: dict[str, str] = field(default_factory=dict)
    stream: bytes | None = None  # what to decode instead of the file (an APNG's default image)


def decode_file(
    path: str | Path,
    *,
    max_bytes: int,
    max_pixels: int,
    background: Sequence[int] = (0, 0, 0),
    reduce_to: tuple[int, int] | None = None,
) -> DecodedImage:
    """Read `path` once, refusing more than `max_bytes` before reading, and decode it."""
    try:
        # O_NONBLOCK: a FIFO dropped into the watch folder must not hang a worker in open().
        with open(path, "rb", opener=lambda p, flags: os.open(p, flags | getattr(os, "O_NONBLOCK", 0))) as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise UnsupportedImage("not a regular file", path=path, reason="not_image")
            if info.st_size > max_bytes:
                raise ImageTooLarge(f"{info.st_size} bytes is over the limit of {max_bytes}", path=path)
            data = file.read(info.st_size + 1)
    except IsADirectoryError as exc:
        raise UnsupportedImage("a directory, not a file", path=path, reason="not_image") from exc
    except OSError as exc:  # vanished, locked, unreadable for now: worth another try
        raise IncompleteImage(f"cannot read the file: {exc.strerror or exc}", path=path) from exc
    if len(data) != info.st_size:
        raise IncompleteImage("the file changed size while it was read", path=path)
    return decode_bytes(data, path=path, max_pixels=max_pixels, background=background, reduce_to=reduce_to)


def decode_bytes(
    data: bytes,
    *,
    path: str | Path,
    max_pixels: int,
    background: Sequence[int] = (0, 0, 0),
    reduce_to: tuple[int, int] | None = None,
) -> DecodedImage:
    """Decode an image held in memory; `path` only names it in errors.

    `reduce_to=(w, h)` lets a JPEG at least twice that size (upright) be decoded
    at 1/2, 1/4 or 1/8 scale, never below (w, h). Raises only errors of
    :mod:`service.errors` (and ValueError for a bad `background`/`reduce_to`).
    """
    bg = _check_background(background)
    target = _check_reduce_to(reduce_to)
    if not data:
        raise CorruptImage("empty file (0 bytes)", path=path, reason="empty")
    header = _inspect(data, path)
    try:
        rgb, size, orientation = _pixels(data, header, path=path, max_pixels=max_pixels, bg=bg, target=target)
    except (InputError, MemoryError):
        raise
    except Exception as exc:  # the container is complete, so a decoder's complaint means damaged data
        raise CorruptImage(f"{header.format} data cannot be decoded: {exc}", path=path) from exc
    if orientation in _UPRIGHT:
        rgb = _UPRIGHT[orientation](rgb)
        size = (size[1], size[0]) if orientation >= 5 else size
    return DecodedImage(
        rgb=np.ascontiguousarray(rgb),
        format=header.format,
        source_size=size,
        text=header.text,
        sha256=hashlib.sha256(data).hexdigest(),
    )


# --- pixels -------------------------------------------------------------------------------------


def _pixels(
    data: bytes,
    header: _Header,
    *,
    path: str | Path,
    max_pixels: int,
    bg: tuple[int, int, int],
    target: tuple[int, int] | None,
) -> tuple[np.ndarray, tuple[int, int], int]:
    """RGB uint8 pixels as stored (not yet upright), the stored (w, h) and the EXIF orientation."""
    if header.size is not None and header.cv2_flags:
        _check_size(header.size, path=path, max_pixels=max_pixels)
        pixels = _cv2_decode(header.stream or data, header.cv2_flags)
        if header.grey_key is not None:
            alpha = np.where(pixels == header.grey_key, 0, np.iinfo(pixels.dtype).max).astype(pixels.dtype)
            pixels = np.dstack([pixels, pixels, pixels, alpha])
        return _finish(pixels, bg), header.size, header.orientation
    if header.size is not None:  # checked before Pillow's open, which may allocate (animated WebP)
        _check_size(header.size, path=path, max_pixels=max_pixels)
    with _pillow(data, header.format, path) as im:
        _check_size(im.size, path=path, max_pixels=max_pixels)
        if header.format == "TIFF":
            _check_tiff_extent(im, len(data), path)
        orientation = _orientation(im)
        if header.format == "JPEG" and im.mode in ("L", "RGB"):
            flags = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
            if target is not None:
                flags |= _reduction(im.size, target, swapped=orientation >= 5)
            return _cv2_decode(data, flags), im.size, orientation
        return _from_pillow(im, bg, path), im.size, orientation


def _cv2_decode(data: bytes, flags: int) -> np.ndarray:
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if pixels is None or pixels.size == 0:
        raise ValueError("OpenCV could not decode it")
    if flags == cv2.IMREAD_UNCHANGED and pixels.ndim == 3:
        # Only IMREAD_UNCHANGED (needed for alpha) keeps BGR(A); the other paths ask for RGB.
        return cv2.cvtColor(pixels, cv2.COLOR_BGRA2RGBA if pixels.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return pixels


def _reduction(size: tuple[int, int], target: tuple[int, int], *, swapped: bool) -> int:
    """The IMREAD_REDUCED_* scale bits whose output still covers `target`, or 0."""
    tw, th = (target[1], target[0]) if swapped else target
    for scale, flag in _REDUCED:  # the GRAYSCALE variants: the scale bits without IMREAD_COLOR
        if -(-size[0] // scale) >= tw and -(-size[1] // scale) >= th:  # libjpeg rounds scaled sizes up
            return flag
    return 0


@contextmanager
def _pillow(data: bytes, fmt: str, path: str | Path) -> Iterator[Image.Image]:
    """Pillow's lazy open (header only), limited to the format the container walk found."""
    with warnings.catch_warnings():
        # Pillow's bomb *warning* fires below our own limit; EXIF/TIFF quibbles are not log lines.
        warnings.simplefilter("ignore")
        try:
            im = Image.open(io.BytesIO(data), formats=[fmt])
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge(f"header dimensions over Pillow's hard limit: {exc}", path=path, reason="bomb") from exc
        with im:
            yield im


def _from_pillow(im: Image.Image, bg: tuple[int, int, int], path: str | Path) -> np.ndarray:
    """The first frame, whatever Pillow's mode, as RGB uint8 composited on `bg`."""
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return _finish(np.asarray(im).astype(np.uint16), bg)  # Pillow's I;16 -> L clips; we scale
    if mode in ("LA", "La", "PA", "RGBA", "RGBa") or (mode in ("L", "P", "RGB") and "transparency" in im.info):
        return _finish(np.asarray(im.convert("RGBA")), bg)
    if mode in ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr"):
        return np.asarray(im.convert("RGB"))
    raise UnsupportedImage(f"{im.format} images in mode {mode} are not supported", path=path)


def _finish(pixels: np.ndarray, bg: tuple[int, int, int]) -> np.ndarray:
    """Grey, RGB or RGBA at 8 or 16 bits -> RGB uint8, alpha composited on `bg`."""
    if pixels.ndim == 2:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_GRAY2RGB)
    if pixels.shape[2] == 4:
        return _composite(pixels, bg)
    if pixels.dtype == np.uint16:
        return cv2.convertScaleAbs(pixels, alpha=255 / 65535)  # round(v / 257): scaled, never clipped
    return pixels


def _composite(rgba: np.ndarray, bg: tuple[int, int, int]) -> np.ndarray:
    # Plane by plane: numpy broadcasting over a trailing axis of 3 runs ~5x slower.
    *colour, alpha = cv2.split(rgba)
    if rgba.dtype == np.uint16:
        a = alpha.astype(np.float32) / 65535
        planes = [
            np.rint(p.astype(np.float32) * (a / 257) + b * (1 - a)).astype(np.uint8)
            for p, b in zip(colour, bg, strict=True)
        ]
        return cv2.merge(planes)
    if alpha.min() == 255:
        return cv2.merge(colour)
    a = alpha.astype(np.uint16)
    clear = 255 - a
    # (c * a + bg * (255 - a)) / 255, rounded: exact, x / 255 is never within float error of .5
    return cv2.merge(
        [cv2.convertScaleAbs(p * a + clear * np.uint16(b), alpha=1 / 255) for p, b in zip(colour, bg, strict=True)]
    )


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # a damaged EXIF block costs the orientation, not the image
        return 1


def _exif_orientation(raw: bytes) -> int:
    try:
        exif = Image.Exif()
        exif.load(raw)
        return int(exif.get(0x0112, 1))
    except Exception:  # as above
        return 1


def _check_size(size: tuple[int, int], *, path: str | Path, max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise CorruptImage(f"header claims {width}x{height} pixels", path=path)
    if width * height > max_pixels or max(width, height) > MAX_SIDE:
        raise ImageTooLarge(f"header claims {width}x{height} pixels, over the limit", path=path, reason="bomb")


def _check_background(background: Sequence[int]) -> tuple[int, int, int]:
    values = tuple(background)
    if len(values) != 3 or not all(isinstance(v, int | np.integer) and 0 <= v <= 255 for v in values):
        raise ValueError(f"background must be three integers in 0..255 (R, G, B), got {background!r}")
    return (int(values[0]), int(values[1]), int(values[2]))


def _check_reduce_to(reduce_to: tuple[int, int] | None) -> tuple[int, int] | None:
    if reduce_to is None:
        return None
    values = tuple(reduce_to)
    if len(values) != 2 or not all(isinstance(v, int | np.integer) and v > 0 for v in values):
        raise ValueError(f"reduce_to must be (width, height) in positive integers, got {reduce_to!r}")
    return (int(values[0]), int(values[1]))


# --- containers: complete? how big? before any pixel is decoded ------------------------------------


def _inspect(data: bytes, path: str | Path) -> _Header:
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return _INSPECT[fmt](data, path)
        if len(data) < len(magic) and magic.startswith(data):
            raise IncompleteImage(f"only {len(data)} bytes of a {fmt} signature", path=path)
    raise _not_image(data, path)


def _not_image(data: bytes, path: str | Path) -> UnsupportedImage:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                fmt = im.format
    except Exception:
        return UnsupportedImage("not an image", path=path, reason="not_image")
    return UnsupportedImage(f"{fmt} images are not supported", path=path)


def _inspect_png(data: bytes, path: str | Path) -> _Header:
    view, pos, end = memoryview(data), 8, 8
    chunks: list[tuple[bytes, int, int]] = []  # (type, start, end) of every chunk up to IEND
    while not chunks or chunks[-1][0] != b"IEND":
        if pos + 12 > len(data):
            raise IncompleteImage(f"PNG ends at byte {len(data)} before its IEND chunk", path=path)
        length, kind = int.from_bytes(data[pos : pos + 4], "big"), data[pos + 4 : pos + 8]
        if length > 0x7FFFFFFF or not kind.isalpha() or (not chunks and kind != b"IHDR"):
            raise CorruptImage(f"PNG chunk structure broken at byte {pos}", path=path)
        end = pos + 12 + length
        if end > len(data):
            raise IncompleteImage(f"PNG ends inside its {kind.decode()} chunk", path=path)
        # libpng verifies IDAT itself; the rest we read (text, eXIf) or strip (APNG) must be checked here.
        if kind != b"IDAT" and zlib.crc32(view[pos + 4 : end - 4]) != int.from_bytes(data[end - 4 : end], "big"):
            raise CorruptImage(f"PNG {kind.decode()} chunk at byte {pos} fails its CRC", path=path)
        chunks.append((kind, pos, end))
        pos = end
    body = {kind: data[start + 8 : stop - 4] for kind, start, stop in chunks if kind in (b"IHDR", b"tRNS", b"eXIf")}
    ihdr = body[b"IHDR"]
    depth, colour = (ihdr[8], ihdr[9]) if len(ihdr) == 13 else (0, 0)
    if depth not in _PNG_DEPTHS.get(colour, ()) or not any(kind == b"IDAT" for kind, *_ in chunks):
        raise CorruptImage(f"PNG header invalid (bit depth {depth}, colour type {colour}) or no IDAT", path=path)
    width, height = int.from_bytes(ihdr[0:4], "big"), int.from_bytes(ihdr[4:8], "big")
    header = _Header("PNG", size=(width, height), cv2_flags=_RGB, text=_png_text(view, chunks))
    if colour in (4, 6) or (b"tRNS" in body and colour in (2, 3)):
        header.cv2_flags = cv2.IMREAD_UNCHANGED
    elif b"tRNS" in body and colour == 0 and len(body[b"tRNS"]) >= 2:
        # OpenCV ignores a grey image's colour key: keep it grey and make the key transparent ourselves.
        header.cv2_flags = cv2.IMREAD_UNCHANGED
        key = int.from_bytes(body[b"tRNS"][:2], "big")
        header.grey_key = key * (255 // ((1 << depth) - 1)) if depth < 8 else key  # OpenCV scales 1/2/4 bits to 8
    if b"eXIf" in body:
        header.orientation = _exif_orientation(body[b"eXIf"])
    if any(kind in _APNG_CHUNKS for kind, *_ in chunks):
        # Frame 0 of an APNG is its IDAT image (what Pillow shows first): decode that as a plain PNG.
        header.stream = data[:8] + b"".join(view[s:e] for k, s, e in chunks if k not in _APNG_CHUNKS)
    return header


def _png_text(view: memoryview, chunks: list[tuple[bytes, int, int]]) -> dict[str, str]:
    """tEXt / zTXt / iTXt as Pillow reads them, each value and the total capped (zip bombs)."""
    text: dict[str, str] = {}
    total = 0
    for kind, start, stop in chunks:
        if kind not in (b"tEXt", b"zTXt", b"iTXt") or stop - start - 12 > TEXT_TOTAL_LIMIT:
            continue
        key, _, rest = bytes(view[start + 8 : stop - 4]).partition(b"\0")
        value = _text_value(kind, rest)
        if value is None or not 1 <= len(key) <= 79 or "\0" in value or total + len(value) > TEXT_TOTAL_LIMIT:
            continue  # unreadable, over the caps or not a keyword (the encoder could not write it back)
        text[key.decode("latin-1")] = value
        total += len(value)
    return text


def _text_value(kind: bytes, rest: bytes) -> str | None:
    raw: bytes | None = rest
    if kind == b"zTXt":
        raw = _inflate(rest[1:]) if rest[:1] == b"\0" else None
    elif kind == b"iTXt":
        flag, method = rest[:1], rest[1:2]
        parts = rest[2:].split(b"\0", 2)  # language tag, translated keyword, text
        raw = parts[2] if len(parts) == 3 and flag in (b"\0", b"\1") else None
        if raw is not None and flag == b"\1":
            raw = _inflate(raw) if method == b"\0" else None
    try:
        value = None if raw is None else raw.decode("utf-8" if kind == b"iTXt" else "latin-1")
    except UnicodeDecodeError:
        return None
    return value if value is None or len(value) <= TEXT_VALUE_LIMIT else None


def _inflate(payload: bytes) -> bytes | None:
    """zlib-decompress at most TEXT_VALUE_LIMIT bytes; None if damaged or bigger."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(payload, TEXT_VALUE_LIMIT + 1)
    except zlib.error:
        return None
    return None if len(out) > TEXT_VALUE_LIMIT or inflater.unconsumed_tail else out


def _inspect_jpeg(data: bytes, path: str | Path) -> _Header:
    """Walk the marker segments and the entropy-coded scans to the EOI marker."""
    pos, n = 2, len(data)
    while True:
        pos = data.find(b"\xff", pos)  # libjpeg skips stray bytes between segments too
        while 0 <= pos < n and data[pos] == 0xFF:
            pos += 1  # fill bytes
        if pos < 0 or pos >= n:
            raise IncompleteImage("JPEG ends before its EOI marker", path=path)
        marker = data[pos]
        pos += 1
        if marker == 0xD9:
            return _Header("JPEG")
        if marker == 0x00 or marker == 0x01 or 0xD0 <= marker <= 0xD8:
            continue  # no length field
        if pos + 2 > n:
            raise IncompleteImage("JPEG ends inside a segment header", path=path)
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2:
            raise CorruptImage(f"JPEG segment at byte {pos} has length {length}", path=path)
        pos += length
        if pos > n:
            raise IncompleteImage("JPEG ends inside a segment", path=path)
        if marker == 0xDA:  # a scan: entropy-coded data runs to the next marker other than RSTn or a stuffed 0
            found = _SCAN_END.search(data, pos)
            if found is None:
                raise IncompleteImage("JPEG ends inside its image data", path=path)
            pos = found.start()


def _inspect_webp(data: bytes, path: str | Path) -> _Header:
    if len(data) < 12:
        raise IncompleteImage("WebP ends inside its RIFF header", path=path)
    if data[8:12] != b"WEBP":
        raise _not_image(data, path)  # another RIFF file (WAV, AVI)
    end = 8 + int.from_bytes(data[4:8], "little")
    if len(data) < end:
        raise IncompleteImage(f"WebP holds {len(data)} of its {end} bytes", path=path)
    size, animated, orientation, pos = None, False, 1, 12
    while pos + 8 <= end:
        kind, length = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        body = data[pos + 8 : pos + 8 + length]
        if pos + 8 + length > end:
            raise CorruptImage(f"WebP chunk {kind!r} runs past the RIFF end", path=path)
        if kind == b"VP8X" and length >= 10:
            animated = bool(body[0] & 0x02)
            size = (1 + int.from_bytes(body[4:7], "little"), 1 + int.from_bytes(body[7:10], "little"))
        elif kind == b"VP8 " and size is None and length >= 10:
            size = (int.from_bytes(body[6:8], "little") & 0x3FFF, int.from_bytes(body[8:10], "little") & 0x3FFF)
        elif kind == b"VP8L" and size is None and length >= 5:
            bits = int.from_bytes(body[1:5], "little")
            size = ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
        elif kind == b"EXIF":
            orientation = _exif_orientation(body)
        pos += 8 + length + (length & 1)
    if size is None:
        raise CorruptImage("WebP has no image chunk", path=path)
    return _Header("WEBP", size=size, cv2_flags=0 if animated else cv2.IMREAD_UNCHANGED, orientation=orientation)


def _inspect_gif(data: bytes, path: str | Path) -> _Header:
    """Walk the blocks to the trailer: a GIF cut anywhere before it is still being written."""
    pos = 13 + (3 << ((data[10] & 7) + 1) if len(data) > 10 and data[10] & 0x80 else 0)
    while True:
        if pos >= len(data):
            raise IncompleteImage("GIF ends before its trailer", path=path)
        block = data[pos]
        if block == 0x3B:
            return _Header("GIF")
        if block == 0x21:
            pos += 2
        elif block == 0x2C:
            local = 3 << ((data[pos + 9] & 7) + 1) if pos + 9 < len(data) and data[pos + 9] & 0x80 else 0
            pos += 10 + local + 1  # descriptor, local colour table, LZW minimum code size
        else:
            raise CorruptImage(f"GIF block type 0x{block:02x} at byte {pos} is unknown", path=path)
        while pos < len(data) and data[pos]:  # data sub-blocks up to the empty terminator
            pos += 1 + data[pos]
        pos += 1


def _inspect_bmp(data: bytes, path: str | Path) -> _Header:
    if len(data) >= 18 and int.from_bytes(data[14:18], "little") not in _BMP_HEADER_SIZES:
        raise _not_image(data, path)  # "BM" is also how plenty of text starts
    declared = int.from_bytes(data[2:6], "little") if len(data) >= 6 else 0
    needed = 14 + (int.from_bytes(data[14:18], "little") if len(data) >= 18 else 4)
    if len(data) < max(declared, needed):
        raise IncompleteImage(f"BMP holds {len(data)} of its {max(declared, needed)} bytes", path=path)
    return _Header("BMP")


def _inspect_tiff(data: bytes, path: str | Path) -> _Header:
    """The first directory and every value it points to must be in the bytes we hold."""
    order: Literal["little", "big"] = "little" if data[:2] == b"II" else "big"
    big = data[2:4] in (b"+\x00", b"\x00+")  # BigTIFF: 8-byte counts and offsets, 20-byte entries
    word, entry = (8, 20) if big else (4, 12)
    ifd = int.from_bytes(data[8:16] if big else data[4:8], order)
    count_size = 8 if big else 2
    entries = int.from_bytes(data[ifd : ifd + count_size], order) if ifd + count_size <= len(data) else -1
    end = ifd + count_size + entries * entry + word
    if entries < 0 or end > len(data):
        raise IncompleteImage("TIFF ends before its first directory", path=path)
    for at in range(ifd + count_size, end - word, entry):
        kind = int.from_bytes(data[at + 2 : at + 4], order)
        size = _TIFF_TYPE_SIZES.get(kind, 0) * int.from_bytes(data[at + 4 : at + 4 + word], order)
        if size > word and int.from_bytes(data[at + 4 + word : at + 4 + 2 * word], order) + size > len(data):
            raise IncompleteImage("TIFF ends before the values of its first directory", path=path)
    return _Header("TIFF")


def _check_tiff_extent(im: Image.Image, available: int, path: str | Path) -> None:
    """Every strip or tile of the first page must lie inside the bytes we hold."""
    tags = getattr(im, "tag_v2", {})
    for offsets_tag, counts_tag in ((273, 279), (324, 325)):
        offsets, counts = tags.get(offsets_tag), tags.get(counts_tag)
        if offsets is None or counts is None:
            continue
        offsets = offsets if isinstance(offsets, tuple) else (offsets,)
        counts = counts if isinstance(counts, tuple) else (counts,)
        if max((o + c for o, c in zip(offsets, counts, strict=False)), default=0) > available:
            raise IncompleteImage("TIFF ends before its image data", path=path)


_INSPECT = {
    "PNG": _inspect_png,
    "JPEG": _inspect_jpeg,
    "WEBP": _inspect_webp,
    "GIF": _inspect_gif,
    "BMP": _inspect_bmp,
    "TIFF": _inspect_tiff,
}
