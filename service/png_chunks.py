"""The PNG part of the container walk: chunks to IEND, their text, and whether libspng may decode it.

:mod:`service.containers` builds the header from what the walk keeps. Every
chunk we read ourselves is CRC-checked here, and text is inflated under caps
so that a zip bomb in a zTXt chunk costs nothing. The walk keeps only what
decoding uses (IHDR, tRNS, eXIf, the text chunks, where the IDAT run lies,
flags), not a record per chunk, and stops at MAX_CHUNKS: a PNG stuffed with
a million empty ancillary chunks (12 bytes each) cost 4 s and 145 MB before.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from service.errors import CorruptImage, ImageTooLarge, IncompleteImage, InputError

TEXT_VALUE_LIMIT = 4 << 20  # characters kept per text chunk (a big ComfyUI workflow is ~1 MB)
TEXT_TOTAL_LIMIT = 8 << 20  # characters kept over all text chunks
# ComfyUI's text in the images it saves: the API prompt that made them, and the web UI's workflow.
COMFYUI_TEXT_KEYS = ("prompt", "workflow")
# Chunks per file. Encoders write IDATs of 8 KiB (libpng, OpenCV) to 64 KiB (Pillow) and a handful of others:
# 65,536 chunks is 512 MiB of 8 KiB IDATs, twice the default byte limit, and walking that many costs ~0.2 s.
MAX_CHUNKS = 1 << 16
_CRITICAL = (b"IHDR", b"PLTE", b"IDAT", b"IEND")
# ComfyUI's SaveAnimatedPNG keeps its prompt and workflow in "comf" chunks, keyword and text as in tEXt.
_TEXT = (b"tEXt", b"zTXt", b"iTXt", b"comf")
_APNG = (b"acTL", b"fcTL", b"fdAT")
_LIBPNG_MAX_SIDE = 1_000_000  # libpng's default user limit: OpenCV refuses longer sides
_HEAD, _CRC = struct.Struct(">I4s"), struct.Struct(">I")

Chunk = tuple[bytes, int, int]  # type, start (of its length field), end (after its CRC)


@dataclass
class PngChunks:
    """What decoding uses of a PNG's chunks (the last of each kind, as Pillow keeps it)."""

    ihdr: bytes = b""
    ihdr_end: int = 0
    trns: bytes | None = None
    exif: bytes | None = None
    text: list[Chunk] = field(default_factory=list)  # tEXt, zTXt, iTXt; at most MAX_CHUNKS
    idat: tuple[int, int] | None = None  # from the first IDAT's start to the end of the last IDAT of its run
    idat_split: bool = False  # an IDAT after another chunk that followed the first run
    iend: tuple[int, int] = (0, 0)
    apng: bool = False  # acTL, fcTL or fdAT present
    # An ancillary chunk whose name has the reserved bit set (its third letter lowercase: ComfyUI's "comf"):
    # libpng refuses the file for it, Pillow (ComfyUI's reader) passes over it.
    misnamed: bool = False
    libpng_only: bool = False  # an unknown critical chunk or a second IHDR: libpng judges those


def walk_chunks(data: bytes, path: str | Path) -> PngChunks:
    """Walk the PNG `data` up to IEND; `path` only names it in errors."""
    view, pos, count, last = memoryview(data), 8, 0, b""
    found = PngChunks()
    while last != b"IEND":
        if pos + 12 > len(data):
            raise IncompleteImage(f"PNG ends at byte {len(data)} before its IEND chunk", path=path)
        length, kind = _HEAD.unpack_from(data, pos)
        if length > 0x7FFFFFFF or not kind.isalpha() or (pos == 8 and kind != b"IHDR"):
            raise broken(f"PNG chunk structure broken at byte {pos}", data, pos + 7, path)
        end = pos + 12 + length
        if end > len(data):
            raise IncompleteImage(f"PNG ends inside its {kind.decode()} chunk", path=path)
        count += 1
        if count > MAX_CHUNKS:
            raise ImageTooLarge(f"PNG has more than {MAX_CHUNKS} chunks, over the limit", path=path, reason="bomb")
        if kind == b"IDAT":  # libpng verifies IDAT itself (and decode.py before handing it to libspng)
            if found.idat is None or (last == b"IDAT" and not found.idat_split):
                found.idat = (pos if found.idat is None else found.idat[0], end)
            else:
                found.idat_split = True
        else:  # the rest we read (text, eXIf) or strip (APNG) must be checked here
            if zlib.crc32(view[pos + 4 : end - 4]) != _CRC.unpack_from(data, end - 4)[0]:
                raise broken(f"PNG {kind.decode()} chunk at byte {pos} fails its CRC", data, end - 1, path)
            _keep(found, kind, data, pos, end)
        last, pos = kind, end
    found.iend = (pos - 12 - length, pos)
    return found


def broken(message: str, data: bytes, last: int, path: str | Path) -> InputError:
    """The error for a structure that breaks at byte `last` of `data`: CorruptImage(message), unless that
    byte and every one after it are zero.

    A file set to its final size first and filled front to back (SMB copies, download managers, fallocate)
    reads as zeros past what is written; a structure that breaks there is still being written. `last` is
    the last byte of the broken part (a chunk header, a CRC), so a write that stopped inside it counts too.
    """
    if zeros_from(data, last):
        return IncompleteImage(f"{message}, and the rest of the file is zeros: still being written", path=path)
    return CorruptImage(message, path=path)


def zeros_from(data: bytes, pos: int) -> bool:
    """Whether every byte of `data` from `pos` on is zero: what a preallocated file reads as past what is written."""
    return data.count(0, pos) == len(data) - pos


def _keep(found: PngChunks, kind: bytes, data: bytes, start: int, end: int) -> None:
    if kind in _TEXT:
        found.text.append((kind, start, end))
    elif kind == b"IHDR":
        found.libpng_only |= start != 8
        found.ihdr, found.ihdr_end = data[start + 8 : end - 4], end
    elif kind == b"tRNS":
        found.trns = data[start + 8 : end - 4]
    elif kind == b"eXIf":
        found.exif = data[start + 8 : end - 4]
    elif kind in _APNG:
        found.apng = True
    elif not kind[0] & 0x20 and kind not in _CRITICAL:
        found.libpng_only = True
    found.misnamed |= _misnamed(kind)


def _misnamed(kind: bytes) -> bool:
    """An ancillary chunk (first letter lowercase) with the reserved bit (third letter lowercase) set."""
    return bool(kind[0] & 0x20 and kind[2] & 0x20)


def spans(data: bytes | memoryview, start: int, stop: int) -> Iterator[Chunk]:
    """The chunks from `start` to `stop`, a stretch walk_chunks has checked the structure of."""
    while start < stop:
        end = start + 12 + int.from_bytes(data[start : start + 4], "big")
        yield bytes(data[start + 4 : start + 8]), start, end
        start = end


def crcs_hold(data: bytes | memoryview, start: int, stop: int) -> bool:
    """Whether every chunk from `start` to `stop` (an IDAT run, say) passes its CRC."""
    return all(
        zlib.crc32(data[s + 4 : e - 4]) == int.from_bytes(data[e - 4 : e], "big")
        for _, s, e in spans(data, start, stop)
    )


def default_image(data: bytes, found: PngChunks) -> bytes:
    """The PNG without its animation chunks (frame 0 of an APNG is its IDAT image, what Pillow shows first)
    and without misnamed ones (see :attr:`PngChunks.misnamed`)."""
    view = memoryview(data)
    kept = (view[s:e] for kind, s, e in spans(view, 8, found.iend[1]) if kind not in _APNG and not _misnamed(kind))
    return data[:8] + b"".join(kept)


def plain_rgb8(found: PngChunks) -> bool:
    """Is this the PNG a generator writes, one libspng may decode instead of libpng?

    8-bit RGB, standard methods, not interlaced, sides libpng accepts, no unknown
    critical chunk, the IDATs in one run: whatever libpng would refuse or treat
    differently stays with it. libspng gets IHDR, IDAT and IEND only; PLTE is left
    out too, in an RGB image it is only a suggested palette.
    """
    ihdr = found.ihdr
    width, height = int.from_bytes(ihdr[0:4], "big"), int.from_bytes(ihdr[4:8], "big")
    if ihdr[8:13] != b"\x08\x02\x00\x00\x00" or max(width, height) > _LIBPNG_MAX_SIDE:
        return False
    return not found.idat_split and not found.libpng_only


def png_text(view: memoryview, chunks: list[Chunk]) -> tuple[dict[str, str], tuple[str, ...]]:
    """tEXt / zTXt / iTXt as Pillow reads them, each value and the total capped (zip bombs).

    Returns the text kept and the keywords of the chunks left out for being over the caps (a workflow
    too large to carry, which the sidecar and the log name); unreadable chunks are neither.
    """
    text: dict[str, str] = {}
    left_out: list[str] = []
    total = 0
    for kind, start, stop in chunks:
        if kind not in _TEXT:
            continue
        if stop - start - 12 > TEXT_TOTAL_LIMIT:
            # Not even copied: only its keyword is read.
            key = bytes(view[start + 8 : min(stop - 4, start + 8 + 80)]).partition(b"\0")[0]
            left_out += _keyword(key)
            continue
        key, _, rest = bytes(view[start + 8 : stop - 4]).partition(b"\0")
        try:
            value = _text_value(kind, rest)
        except _OverCap:
            left_out += _keyword(key)
            continue
        if value is None or not _keyword(key) or "\0" in value:
            continue  # unreadable or not a keyword (the encoder could not write it back)
        if total + len(value) > TEXT_TOTAL_LIMIT:
            left_out += _keyword(key)
            continue
        text[key.decode("latin-1")] = value
        total += len(value)
    return text, tuple(left_out)


class _OverCap(Exception):
    """A text value longer than :data:`TEXT_VALUE_LIMIT` characters, once decoded."""


def _keyword(key: bytes) -> list[str]:
    """``[key]`` decoded if it is a PNG keyword (1-79 Latin-1 characters), else ``[]``."""
    return [key.decode("latin-1")] if 1 <= len(key) <= 79 else []


def _text_value(kind: bytes, rest: bytes) -> str | None:
    """The decoded value of a text chunk's data after its keyword; None if unreadable."""
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
    if value is not None and len(value) > TEXT_VALUE_LIMIT:
        raise _OverCap
    return value


def _inflate(payload: bytes) -> bytes | None:
    """zlib-decompress at most TEXT_VALUE_LIMIT bytes; None if damaged, :class:`_OverCap` if bigger."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(payload, TEXT_VALUE_LIMIT + 1)
    except zlib.error:
        return None
    if len(out) > TEXT_VALUE_LIMIT or inflater.unconsumed_tail:
        raise _OverCap
    return out
