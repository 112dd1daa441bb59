"""Walk an image's container before any pixel is decoded: is it complete, and how big?

A watch folder sees files while they are still being written, and decoders cannot
tell a cut file from a damaged one: OpenCV just returns nothing, Pillow accepts a
PNG without IEND and, configured as ComfyUI configures it, decodes a cut one with
black rows. So each format is walked here to its end marker first: a file cut
short raises :class:`IncompleteImage` (a retry), a broken structure
:class:`CorruptImage`, anything else :class:`UnsupportedImage`. The walk also
learns what :mod:`service.decode` must know before it allocates: the header
dimensions, which decoder to use, the EXIF orientation and the PNG text chunks
(the PNG chunk walk itself is :mod:`service.png_chunks`).
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
from PIL import Image, TiffImagePlugin

from service.errors import CorruptImage, ImageTooLarge, IncompleteImage, UnsupportedImage
from service.orientation import exif_orientation, png_orientation
from service.png_chunks import broken, default_image, plain_rgb8, png_text, walk_chunks, zeros_from
from service.webp_text import comfyui_text

_RGB = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_ANYDEPTH | cv2.IMREAD_IGNORE_ORIENTATION
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
# A tile side allowed beyond the image's: writers tile small images with their default tiles (256 or 512 in
# libtiff, GDAL, tifffile), at most a few MB each.
TIFF_TILE_SLACK = 1024
# The zero bytes a complete lossy WebP may end with; a longer zero tail is a preallocated file still being
# filled. Lossy VP8 codes a flat region as runs of likely symbols, i.e. zero bytes: files whose lower part is
# one colour end in up to 49,534 zeros (4096x4096, half black, q90 method 0), at most 6.4 bytes per 16x16
# macroblock of the image (measured on 960 files with flat black/grey/white lower parts, 256x256 to
# 1536x864, q30-100, methods 0-6; q0-30 with noise stayed under 1 byte). So 256 bytes, and 16 bytes per
# macroblock (2.5x that worst case): a zero tail shorter than that, the last rows being filled, goes unseen.
# Lossless VP8L has no such bound: at its fastest effort (quality 0, method 0) a flat area ends a complete
# file in tens of thousands of zeros (0.19 bytes per pixel seen), so only the hole check sees it being filled.
WEBP_ZERO_TAIL = 256
WEBP_LOSSY_ZERO_TAIL = 16
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


@dataclass
class Header:
    """What the container walk learnt; `size` None means Pillow's lazy open reads it."""

    format: str
    size: tuple[int, int] | None = None
    cv2_flags: int = 0  # 0: decode with Pillow
    orientation: int = 1
    grey_key: int | None = None  # PNG tRNS colour key of a grey image, as OpenCV returns it
    text: dict[str, str] = field(default_factory=dict)
    text_left_out: tuple[str, ...] = ()  # keywords of PNG text over the caps (see png_chunks.png_text)
    stream: bytes | None = None  # what to decode instead of the file (an APNG's default image)
    # A plain 8-bit RGB PNG (what generators write): (start, end) of its IHDR, its run of IDATs, its IEND.
    rgb8_chunks: tuple[tuple[int, int], ...] = ()


def inspect(data: bytes, path: str | Path) -> Header:
    """Walk the container of `data` (not empty); `path` only names it in errors."""
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


def _inspect_png(data: bytes, path: str | Path) -> Header:
    found = walk_chunks(data, path)
    ihdr, trns = found.ihdr, found.trns
    depth, colour = (ihdr[8], ihdr[9]) if len(ihdr) == 13 else (0, 0)
    if depth not in _PNG_DEPTHS.get(colour, ()) or found.idat is None:
        raise CorruptImage(f"PNG header invalid (bit depth {depth}, colour type {colour}) or no IDAT", path=path)
    width, height = int.from_bytes(ihdr[0:4], "big"), int.from_bytes(ihdr[4:8], "big")
    text, left_out = png_text(memoryview(data), found.text)
    header = Header("PNG", size=(width, height), cv2_flags=_RGB, text=text, text_left_out=left_out)
    if colour in (4, 6) or (trns is not None and colour in (2, 3)):
        header.cv2_flags = cv2.IMREAD_UNCHANGED
    elif trns is not None and colour == 0 and len(trns) >= 2:
        # OpenCV ignores a grey image's colour key: keep it grey and make the key transparent ourselves.
        header.cv2_flags = cv2.IMREAD_UNCHANGED
        key = int.from_bytes(trns[:2], "big")
        header.grey_key = key * (255 // ((1 << depth) - 1)) if depth < 8 else key  # OpenCV scales 1/2/4 bits to 8
    header.orientation = png_orientation(found.exif, header.text)
    if found.apng or found.misnamed:
        # Frame 0 of an APNG is its IDAT image (what Pillow shows first), and a misnamed chunk one Pillow passes
        # over: decode what is left as a plain PNG.
        header.stream = default_image(data, found)
    elif trns is None and plain_rgb8(found):
        header.rgb8_chunks = ((8, found.ihdr_end), found.idat, found.iend)
    return header


def _inspect_jpeg(data: bytes, path: str | Path) -> Header:
    """Walk to the EOI marker, and to that of each image appended right after it (an Ultra HDR gain map, the
    other images of an MPF file): the file is complete when they are. Other bytes after an EOI are ignored,
    as decoders do."""
    pos = _jpeg_end(data, 2, path)
    while data.startswith(b"\xff\xd8\xff", pos):
        pos = _jpeg_end(data, pos + 2, path)
    return Header("JPEG")


def _jpeg_end(data: bytes, pos: int, path: str | Path) -> int:
    """Walk the marker segments and the entropy-coded scans from `pos` (after SOI) to just after EOI."""
    n = len(data)
    while True:
        pos = data.find(b"\xff", pos)  # libjpeg skips stray bytes between segments too
        while 0 <= pos < n and data[pos] == 0xFF:
            pos += 1  # fill bytes
        if pos < 0 or pos >= n:
            raise IncompleteImage("JPEG ends before its EOI marker", path=path)
        marker = data[pos]
        pos += 1
        if marker == 0xD9:
            return pos
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


def _inspect_webp(data: bytes, path: str | Path) -> Header:
    if len(data) < 12:
        raise IncompleteImage("WebP ends inside its RIFF header", path=path)
    if data[8:12] != b"WEBP":
        raise _not_image(data, path)  # another RIFF file (WAV, AVI)
    end = 8 + int.from_bytes(data[4:8], "little")
    if len(data) < end:
        raise IncompleteImage(f"WebP holds {len(data)} of its {end} bytes", path=path)
    size, animated, lossy, pos = None, False, False, 12
    exif = xmp = None
    while pos + 8 <= end:
        kind, length = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        body = data[pos + 8 : pos + 8 + length]
        if 0 in kind:  # no FourCC holds a NUL
            raise broken(f"WebP chunk at byte {pos} has no name", data, pos + 7, path)
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
        elif kind == b"EXIF" and exif is None:  # the first, as libwebp's demuxer (and so Pillow) reads it
            exif = body
        elif kind == b"XMP " and xmp is None:
            xmp = body
        lossy |= kind == b"VP8 " or (kind == b"ANMF" and b"VP8 " in body)
        pos += 8 + length + (length & 1)
    if size is None:
        raise CorruptImage("WebP has no image chunk", path=path)
    # A zero tail inside lossy image data breaks no structure, and libwebp decodes it to garbage.
    macroblocks = -(-size[0] // 16) * -(-size[1] // 16)
    limit = max(WEBP_ZERO_TAIL, WEBP_LOSSY_ZERO_TAIL * macroblocks)
    if lossy and zeros_from(data, len(data) - limit - 1):
        raise IncompleteImage(
            f"WebP ends in over {limit} zero bytes, more than a complete one: still being written", path=path
        )
    orientation = exif_orientation(exif, xmp)
    text, left_out = comfyui_text(exif)
    flags = 0 if animated else cv2.IMREAD_UNCHANGED
    return Header("WEBP", size=size, cv2_flags=flags, orientation=orientation, text=text, text_left_out=left_out)


def _inspect_gif(data: bytes, path: str | Path) -> Header:
    """Walk the blocks to the trailer: a GIF cut anywhere before it is still being written."""
    pos = 13 + (3 << ((data[10] & 7) + 1) if len(data) > 10 and data[10] & 0x80 else 0)
    while True:
        if pos >= len(data):
            raise IncompleteImage("GIF ends before its trailer", path=path)
        block = data[pos]
        if block == 0x3B:
            return Header("GIF")
        if block == 0x21:
            pos += 2
        elif block == 0x2C:
            local = 3 << ((data[pos + 9] & 7) + 1) if pos + 9 < len(data) and data[pos + 9] & 0x80 else 0
            pos += 10 + local + 1  # descriptor, local colour table, LZW minimum code size
        else:
            raise broken(f"GIF block type 0x{block:02x} at byte {pos} is unknown", data, pos, path)
        while pos < len(data) and data[pos]:  # data sub-blocks up to the empty terminator
            pos += 1 + data[pos]
        pos += 1


def _inspect_bmp(data: bytes, path: str | Path) -> Header:
    """Only the declared size can be checked: zeros are valid pixels, so a preallocated BMP being filled
    is caught only where the file system reports the unwritten tail as a hole (decode.decode_file)."""
    if len(data) >= 18 and int.from_bytes(data[14:18], "little") not in _BMP_HEADER_SIZES:
        raise _not_image(data, path)  # "BM" is also how plenty of text starts
    declared = int.from_bytes(data[2:6], "little") if len(data) >= 6 else 0
    needed = 14 + (int.from_bytes(data[14:18], "little") if len(data) >= 18 else 4)
    if len(data) < max(declared, needed):
        raise IncompleteImage(f"BMP holds {len(data)} of its {max(declared, needed)} bytes", path=path)
    return Header("BMP")


def _inspect_tiff(data: bytes, path: str | Path) -> Header:
    """The first directory, every value it points to and the strips or tiles of the first page must be in
    the bytes we hold."""
    order: Literal["little", "big"] = "little" if data[:2] == b"II" else "big"
    big = data[2:4] in (b"+\x00", b"\x00+")  # BigTIFF: 8-byte counts and offsets, 20-byte entries
    word, entry = (8, 20) if big else (4, 12)
    ifd = int.from_bytes(data[8:16] if big else data[4:8], order)
    count_size = 8 if big else 2
    entries = int.from_bytes(data[ifd : ifd + count_size], order) if ifd + count_size <= len(data) else -1
    end = ifd + count_size + entries * entry + word
    if entries < 0 or end > len(data):
        raise IncompleteImage("TIFF ends before its first directory", path=path)
    # Tags are sorted and none is 0: an empty directory, or one ending in tag 0, is where zeros begin.
    last_entry = end - word - entry
    if entries == 0 or int.from_bytes(data[last_entry : last_entry + 2], order) == 0:
        raise broken(f"TIFF directory at byte {ifd} is empty or ends in tag 0", data, max(ifd, last_entry), path)
    for at in range(ifd + count_size, end - word, entry):
        kind = int.from_bytes(data[at + 2 : at + 4], order)
        size = _TIFF_TYPE_SIZES.get(kind, 0) * int.from_bytes(data[at + 4 : at + 4 + word], order)
        if size > word and int.from_bytes(data[at + 4 + word : at + 4 + 2 * word], order) + size > len(data):
            raise IncompleteImage("TIFF ends before the values of its first directory", path=path)
    # Every strip or tile of the first page too: checked here, not on Pillow's open, so that a variant
    # Pillow cannot open is incomplete as well while it is being written.
    tags = tiff_directory(data)
    for offsets_tag, counts_tag in ((273, 279), (324, 325)):
        offsets, counts = _values(tags, offsets_tag), _values(tags, counts_tag)
        if max((o + c for o, c in zip(offsets, counts, strict=False)), default=0) > len(data):
            raise IncompleteImage("TIFF ends before its image data", path=path)
    # The next page's directory: a page is published once, so a file whose first page is complete before the
    # others (writers fill it page by page) must not be.
    following = int.from_bytes(data[end - word : end], order)
    if following and (following + count_size > len(data) or zeros_from(data, following)):
        raise IncompleteImage(f"TIFF ends before the directory of its second page (byte {following})", path=path)
    return Header("TIFF")


def _values(tags: TiffImagePlugin.ImageFileDirectory_v2 | None, tag: int) -> tuple[int, ...]:
    value = tags.get(tag, ()) if tags is not None else ()
    return tuple(v for v in (value if isinstance(value, tuple) else (value,)) if isinstance(v, int))


def tiff_directory(data: bytes) -> TiffImagePlugin.ImageFileDirectory_v2 | None:
    """The first directory of a TIFF as Pillow parses it; None if it does not parse."""
    if data[2:4] == b"\x00+":  # a big-endian BigTIFF, which Pillow takes for a classic TIFF
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns of tags it skips; they are not log lines
            tags = TiffImagePlugin.ImageFileDirectory_v2(data[:16] if data[2] == 43 else data[:8])
            fp = io.BytesIO(data)
            fp.seek(tags.next)
            tags.load(fp)  # out-of-line values capped at the file's size in all, as in Pillow's open
    except Exception:  # whatever Pillow's parser fails on, its open will fail on too, and say so
        return None
    return tags


def check_tiff_tiles(im: Image.Image, path: str | Path, *, max_pixels: int) -> None:
    """No tile of the first page may cost more than the image: checked before any pixel is decoded.

    libtiff allocates a whole tile before decoding it, whatever the image size: a
    150-byte 64x64 file claiming 24576x24576 deflate tiles made it allocate 1.8 GB.
    A tile over `max_pixels`, or longer than the image (rounded up to 16) and than
    TIFF_TILE_SLACK on a side, is refused as a bomb. Strips need no such check:
    libtiff clamps RowsPerStrip to the image height (measured: a RowsPerStrip of
    10**7 on a 64x64 image allocates nothing more).
    """
    tags = getattr(im, "tag_v2", {})
    tile_width, tile_length = tags.get(322), tags.get(323)
    if not isinstance(tile_width, int) or not isinstance(tile_length, int):
        return
    width, height = im.size
    longer = tile_width > max(-(-width // 16) * 16, TIFF_TILE_SLACK)
    longer |= tile_length > max(-(-height // 16) * 16, TIFF_TILE_SLACK)
    if longer or tile_width * tile_length > max_pixels:
        raise ImageTooLarge(
            f"TIFF tiles of {tile_width}x{tile_length} pixels for a {width}x{height} image, over the limit",
            path=path,
            reason="bomb",
        )


_INSPECT = {
    "PNG": _inspect_png,
    "JPEG": _inspect_jpeg,
    "WEBP": _inspect_webp,
    "GIF": _inspect_gif,
    "BMP": _inspect_bmp,
    "TIFF": _inspect_tiff,
}
