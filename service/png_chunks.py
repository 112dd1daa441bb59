"""The PNG part of the container walk: chunks to IEND, their text, and whether libspng may decode it.

:mod:`service.containers` builds the header from what these return. Every
chunk we read ourselves is CRC-checked here, and text is inflated under caps
so that a zip bomb in a zTXt chunk costs nothing.
"""

from __future__ import annotations

import zlib
from pathlib import Path

from service.errors import CorruptImage, IncompleteImage

TEXT_VALUE_LIMIT = 4 << 20  # characters kept per text chunk (a big ComfyUI workflow is ~1 MB)
TEXT_TOTAL_LIMIT = 8 << 20  # characters kept over all text chunks
_CRITICAL = (b"IHDR", b"PLTE", b"IDAT", b"IEND")
_LIBPNG_MAX_SIDE = 1_000_000  # libpng's default user limit: OpenCV refuses longer sides

Chunk = tuple[bytes, int, int]  # type, start (of its length field), end (after its CRC)


def walk_chunks(data: bytes, path: str | Path) -> list[Chunk]:
    """Every chunk of the PNG `data` up to IEND; `path` only names it in errors."""
    view, pos, end = memoryview(data), 8, 8
    chunks: list[Chunk] = []
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
    return chunks


def plain_rgb8(ihdr: bytes, chunks: list[Chunk]) -> bool:
    """Is this the PNG a generator writes, one libspng may decode instead of libpng?

    8-bit RGB, standard methods, not interlaced, sides libpng accepts, no unknown
    critical chunk, the IDATs in one run: whatever libpng would refuse or treat
    differently stays with it. libspng gets IHDR, IDAT and IEND only; PLTE is left
    out too, in an RGB image it is only a suggested palette.
    """
    width, height = int.from_bytes(ihdr[0:4], "big"), int.from_bytes(ihdr[4:8], "big")
    if ihdr[8:13] != b"\x08\x02\x00\x00\x00" or max(width, height) > _LIBPNG_MAX_SIDE:
        return False
    idat = [i for i, (kind, *_) in enumerate(chunks) if kind == b"IDAT"]
    unknown_critical = any(not kind[0] & 0x20 and kind not in _CRITICAL for kind, *_ in chunks)
    return idat[-1] - idat[0] + 1 == len(idat) and not unknown_critical


def png_text(view: memoryview, chunks: list[Chunk]) -> dict[str, str]:
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
