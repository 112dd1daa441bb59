"""Source bytes -> upright RGB pixels, with every guard a watch folder needs.

Pixels are decoded only after :mod:`service.containers` has found the
container complete and its header dimensions within the limit, so a file still
being written is a retry and a decompression bomb allocates nothing. OpenCV
decodes PNG (every bit depth and colour type), grey/YCbCr JPEG and still WebP,
the fast path; Pillow decodes CMYK JPEG, animated WebP, GIF, BMP and TIFF
(:mod:`service.pillow_decode`). Every decoder failure maps to an error of
:mod:`service.errors`. Pixels are turned upright exactly once
(:mod:`service.orientation`).

With the `fast` extra installed, plain 8-bit RGB PNGs (what generators write)
go to libspng (`pyspng`) instead: `decode_bytes` of a 1024x1024 ComfyUI PNG
took 22-30 ms against 30-43 ms with OpenCV (one thread, measured), to the same
pixels. libspng gets only the IHDR, IDAT and IEND chunks, after their CRCs are
checked here (pyspng ignores them); anything it fails on goes to OpenCV, which
decides. pyspng does not check the zlib checksum either, which cannot be
checked without inflating again: a stream with valid CRCs and a wrong checksum,
which only a faulty encoder writes, decodes here where libpng may refuse it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from service import containers
from service.errors import CorruptImage, ImageTooLarge, IncompleteImage, InputError, UnsupportedImage
from service.extras import optional_module
from service.orientation import pillow_orientation, upright
from service.pillow_decode import opened, pillow_pixels
from service.png_chunks import TEXT_TOTAL_LIMIT, TEXT_VALUE_LIMIT, crcs_hold

_spng = optional_module("pyspng")

# The text caps belong to the container walk; they are re-exported as part of what DecodedImage.text promises.
__all__ = [
    "MAX_SIDE",
    "PNG_DECODER",
    "TEXT_TOTAL_LIMIT",
    "TEXT_VALUE_LIMIT",
    "DecodedImage",
    "decode_bytes",
    "decode_file",
]

PNG_DECODER = "pyspng" if _spng is not None else "opencv"
"""The decoder of plain 8-bit RGB PNGs, read at every call: "pyspng" when installed; assign "opencv" to compare."""

MAX_SIDE = 1 << 20  # OpenCV's own limit per side; nothing longer is a video start frame
_REDUCED = (
    (8, cv2.IMREAD_REDUCED_GRAYSCALE_8),
    (4, cv2.IMREAD_REDUCED_GRAYSCALE_4),
    (2, cv2.IMREAD_REDUCED_GRAYSCALE_2),
)


@dataclass(frozen=True, eq=False)  # eq=False: == on arrays has no single truth value
class DecodedImage:
    rgb: np.ndarray  # (H, W, 3) uint8, C-contiguous, upright, alpha composited
    format: str  # "PNG", "JPEG", "WEBP", "GIF", "BMP" or "TIFF"
    source_size: tuple[int, int]  # (width, height) of the full-resolution source, upright
    # PNG text chunks (ComfyUI's "prompt", "workflow"), or those two from a WebP's EXIF (service.webp_text), capped
    text: Mapping[str, str]
    sha256: str  # of exactly the bytes decoded
    text_left_out: tuple[str, ...] = ()  # keywords of that text over the caps, not in `text`


def decode_file(
    path: str | Path,
    *,
    max_bytes: int,
    max_pixels: int,
    background: Sequence[int] = (0, 0, 0),
    reduce_to: tuple[int, int] | None = None,
    holes_pending: bool = True,
) -> DecodedImage:
    """Read `path` once, refusing more than `max_bytes` before reading, and decode it.

    `holes_pending`: a hole to the end of the file means it is still being written (see `_unwritten_tail`).
    The daemon passes False on a source's last try: a hole that stayed through every retry is no write.
    """
    try:
        # O_NONBLOCK: a FIFO dropped into the watch folder must not hang a worker in open().
        with open(path, "rb", opener=lambda p, flags: os.open(p, flags | getattr(os, "O_NONBLOCK", 0))) as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise UnsupportedImage("not a regular file", path=path, reason="not_image")
            if info.st_size > max_bytes:
                raise ImageTooLarge(f"{info.st_size} bytes is over the limit of {max_bytes}", path=path)
            if holes_pending and _unwritten_tail(file.fileno(), info.st_size):
                raise IncompleteImage(
                    "the file has unwritten blocks at its end (preallocated, still being written)", path=path
                )
            file.seek(0)  # the hole probe moved the descriptor's offset
            data = file.read(info.st_size + 1)
    except IsADirectoryError as exc:
        raise UnsupportedImage("a directory, not a file", path=path, reason="not_image") from exc
    except OSError as exc:  # vanished, locked, unreadable for now: worth another try
        raise IncompleteImage(f"cannot read the file: {exc.strerror or exc}", path=path) from exc
    if len(data) != info.st_size:
        raise IncompleteImage("the file changed size while it was read", path=path)
    return decode_bytes(data, path=path, max_pixels=max_pixels, background=background, reduce_to=reduce_to)


def _unwritten_tail(fd: int, size: int) -> bool:
    """Whether the file system reports a hole from some offset to the end of the file.

    Copies over SMB (Samba sets the final size first), download managers and
    fallocate make the file its final size before filling it front to back; until
    then its tail reads as zeros, which no content check can tell from pixels in a
    BMP or an uncompressed TIFF. ext4 and tmpfs report those blocks as a hole, and
    blocks written but not yet allocated (delayed allocation) as data (measured).
    A hole with data after it is an ordinary sparse file. Where holes cannot be
    asked for, the container walks still catch a zero tail in PNG, GIF, TIFF and WebP.
    A file system that stores written zero blocks as holes (ZFS with compression)
    makes a complete BMP or TIFF ending in 128 KiB of black look the same: retried,
    and decoded as it is on its last try.
    """
    if size == 0:  # SEEK_HOLE at the end fails with ENXIO; an empty file is refused later as such
        return False
    try:
        hole = os.lseek(fd, 0, os.SEEK_HOLE)
    except (AttributeError, OSError):  # no SEEK_HOLE here, or not on this file system (EINVAL, ENOTSUP...)
        return False
    if hole >= size:
        return False
    try:
        os.lseek(fd, hole, os.SEEK_DATA)
    except OSError as exc:
        return exc.errno == errno.ENXIO  # no data after the hole
    return False


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
        # A file created empty and filled after (a placeholder, `: > f; cat img >> f`) is empty for a moment:
        # retried like a file cut short, and rejected as empty only if it stays so.
        raise IncompleteImage("empty file (0 bytes)", path=path, reason="empty")
    header = containers.inspect(data, path)
    try:
        rgb, size, orientation = _pixels(data, header, path=path, max_pixels=max_pixels, bg=bg, target=target)
    except (InputError, MemoryError):
        raise
    except Exception as exc:  # the container is complete, so a decoder's complaint means damaged data
        raise CorruptImage(f"{header.format} data cannot be decoded: {exc}", path=path) from exc
    rgb, size = upright(rgb, orientation, size)
    return DecodedImage(
        rgb=np.ascontiguousarray(rgb),
        format=header.format,
        source_size=size,
        text=header.text,
        sha256=hashlib.sha256(data).hexdigest(),
        text_left_out=header.text_left_out,
    )


# --- pixels -------------------------------------------------------------------------------------


def _pixels(
    data: bytes,
    header: containers.Header,
    *,
    path: str | Path,
    max_pixels: int,
    bg: tuple[int, int, int],
    target: tuple[int, int] | None,
) -> tuple[np.ndarray, tuple[int, int], int]:
    """RGB uint8 pixels as stored (not yet upright), the stored (w, h) and the EXIF orientation."""
    if header.size is not None and header.cv2_flags:
        _check_size(header.size, path=path, max_pixels=max_pixels)
        pixels = _spng_decode(data, header.rgb8_chunks) if header.rgb8_chunks else None
        if pixels is None:
            pixels = _cv2_decode(header.stream or data, header.cv2_flags)
        if header.grey_key is not None:
            alpha = np.where(pixels == header.grey_key, 0, np.iinfo(pixels.dtype).max).astype(pixels.dtype)
            pixels = np.dstack([pixels, pixels, pixels, alpha])
        return _finish(pixels, bg), header.size, header.orientation
    if header.size is not None:  # checked before Pillow's open, which may allocate (animated WebP)
        _check_size(header.size, path=path, max_pixels=max_pixels)
    with opened(data, header.format, path) as im:
        _check_size(im.size, path=path, max_pixels=max_pixels)
        if header.format == "TIFF":
            containers.check_tiff_tiles(im, path, max_pixels=max_pixels)
        if header.format != "JPEG":
            # Size and orientation of the loaded image: Pillow turns a TIFF upright while loading it.
            pixels = pillow_pixels(im, path)
            return _finish(pixels, bg), im.size, pillow_orientation(im)
        orientation = pillow_orientation(im)  # before decoding: a reduced decode must cover the upright target
        if im.mode in ("L", "RGB"):
            flags = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
            if target is not None:
                flags |= _reduction(im.size, target, swapped=orientation >= 5)
            return _cv2_decode(data, flags), im.size, orientation
        return _finish(pillow_pixels(im, path), bg), im.size, orientation


def _spng_decode(data: bytes, chunks: tuple[tuple[int, int], ...]) -> np.ndarray | None:
    """libspng's RGB pixels of a plain 8-bit RGB PNG, from these chunks only; None: OpenCV decides.

    Only the critical chunks: libspng would inflate zTXt and iCCP itself, and our
    container walk has read the text already.
    """
    if _spng is None or PNG_DECODER != "pyspng":
        return None
    view = memoryview(data)
    if not all(crcs_hold(view, start, end) for start, end in chunks):
        return None  # pyspng ignores CRCs; libpng refuses a damaged IDAT, so the file is left to it
    try:
        pixels: np.ndarray = _spng.load(b"".join([view[:8], *(view[start:end] for start, end in chunks)]), "RGB")
    except Exception:  # whatever libspng complains of, libpng gets the last word
        return None
    return pixels


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
