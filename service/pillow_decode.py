"""Pillow's part of decoding: open limited to one format, its failures sorted, the first frame as an array.

Pillow decodes what OpenCV does not: CMYK JPEG, animated WebP, GIF, BMP and
TIFF. Once :mod:`service.containers` has found the file complete, Pillow fails
for one of two reasons: a variant of the format it does not read (a float TIFF
as OpenCV writes it, a BMP holding a JPEG) is :class:`UnsupportedImage`, and
anything else is damage, :class:`CorruptImage`. ``Image.open`` sums up a
failure as "cannot identify image file <_io.BytesIO object at 0x7f...>", which
says neither and changes from run to run, so the format's plugin is asked
again for its own reason.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, TiffImagePlugin, UnidentifiedImageError

from service.containers import tiff_directory
from service.errors import CorruptImage, InputError, UnsupportedImage

# How Pillow words a variant it does not read (BMP "Unsupported BMP compression (4)", TIFF "unknown pixel
# mode", JPEG "cannot handle 12-bit layers"); anything else it fails on is damage.
_VARIANT_WORDS = ("unsupported", "unknown pixel mode", "cannot handle")
# The values real files hold: a header outside them is damage, whatever Pillow calls it.
_TIFF_BITS = {1, 2, 4, 8, 12, 16, 24, 32, 64}
_SAMPLE_FORMATS = {1: "unsigned integer", 2: "signed integer", 3: "floating-point", 4: "untyped"}
_SAMPLE_FORMATS |= {5: "complex integer", 6: "complex floating-point"}
# photometric interpretation -> its name, and the samples per pixel it has before any extra ones
_PHOTOMETRIC = {0: ("inverted grey", 1), 1: ("grey", 1), 2: ("RGB", 3), 3: ("palette", 1), 4: ("mask", 1)}
_PHOTOMETRIC |= {6: ("YCbCr", 3), 8: ("CIELab", 3), 9: ("ICCLab", 3), 10: ("ITULab", 3)}
_PHOTOMETRIC |= {32844: ("LogL", 1), 32845: ("LogLuv", 3), 5: ("CMYK", 0), 34892: ("linear raw", 0)}  # 0: any
_TIFF_DEFAULTS = ((277, 1), (262, 0), (259, 1))  # samples per pixel, photometric, compression: Pillow's defaults
# compressions in use that Pillow has no name for (it names the others)
_TIFF_COMPRESSIONS = {9: "JBIG", 10: "JBIG2", 34661: "JBIG", 34712: "JPEG 2000", 34887: "LERC", 50002: "JPEG XL"}
_BMP_BITS = (1, 2, 4, 8, 16, 24, 32, 64)
_BMP_COMPRESSION = {0: "no", 1: "RLE8", 2: "RLE4", 3: "bitfields", 4: "JPEG", 5: "PNG", 6: "alpha bitfields"}
_BMP_COMPRESSION |= {11: "CMYK", 12: "CMYK RLE8", 13: "CMYK RLE4"}

# Pillow's own bomb limit (an error at twice this, 178,956,970 pixels) would override a --max-pixels set above
# it, in a message naming a limit nobody can change. Ours holds instead: decode.py checks the header size
# right after Pillow's open, which reads the header only (a GIF frame past the screen enlarges im.size there,
# which is what gets checked), and before any load; containers.py's open of a format we do not read only
# asks its name. Set on import: any Image.open in this process is one of those.
Image.MAX_IMAGE_PIXELS = None


@contextmanager
def opened(data: bytes, fmt: str, path: str | Path) -> Iterator[Image.Image]:
    """Pillow's lazy open (header only), limited to the format the container walk found.

    A variant Pillow does not read, at open or while loading inside the block,
    raises UnsupportedImage; other failures in the block pass through.
    """
    with warnings.catch_warnings():
        # EXIF/TIFF quibbles are not log lines.
        warnings.simplefilter("ignore")
        try:
            with Image.open(io.BytesIO(data), formats=[fmt]) as im:
                yield im
        except UnidentifiedImageError:
            raise _unidentified(data, fmt, path) from None  # its own text holds an object's address
        except (OSError, ValueError) as exc:
            described = variant(data, fmt) if _says_variant(str(exc)) else None
            if described is None:
                raise  # damage: the caller reports it as CorruptImage
            raise UnsupportedImage(f"{described} is not supported: {exc}", path=path) from exc


def pillow_pixels(im: Image.Image, path: str | Path) -> np.ndarray:
    """The first frame, loaded, as grey uint16, RGB uint8 or RGBA uint8 (straight alpha)."""
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(im).astype(np.uint16)  # Pillow's I;16 -> L clips; the caller scales
    if mode in ("LA", "La", "PA", "RGBA", "RGBa") or (mode in ("L", "P", "RGB") and "transparency" in im.info):
        return np.asarray(im.convert("RGBA"))
    if mode in ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr"):
        return np.asarray(im.convert("RGB"))
    raise UnsupportedImage(f"{im.format} images in mode {mode} are not supported", path=path)


def variant(data: bytes, fmt: str) -> str | None:
    """The variant a complete `fmt` file's header describes, for messages; None: no real file has it."""
    if fmt == "TIFF":
        return _tiff_variant(data)
    if fmt == "BMP":
        return _bmp_variant(data)
    if fmt == "JPEG":
        return _jpeg_variant(data)
    return f"this {fmt} variant"


def _unidentified(data: bytes, fmt: str, path: str | Path) -> InputError:
    """Why Pillow could not open a file of `fmt` whose container is complete, from its plugin itself."""
    cause: BaseException | None = None
    try:
        Image.OPEN[fmt][0](io.BytesIO(data), "")
    except SyntaxError as exc:  # ImageFile wraps what its plugin raised (IndexError, KeyError, struct.error...)
        reason, cause = str(exc), exc.__cause__
    except Exception as exc:
        reason, cause = str(exc), exc
    else:
        reason = "Pillow cannot identify it"
    described = variant(data, fmt)
    if described is not None and (isinstance(cause, KeyError) or (cause is None and _says_variant(reason))):
        # KeyError: a lookup of a mode or compression Pillow does not have, worded as the bare key
        reason = f"Pillow has no reader for {reason}" if reason == str(cause) else reason
        return UnsupportedImage(f"{described} is not supported: {reason}", path=path)
    return CorruptImage(f"{fmt} header cannot be read: {reason}", path=path)


def _says_variant(message: str) -> bool:
    lowered = message.lower()
    return any(words in lowered for words in _VARIANT_WORDS)


def _tiff_variant(data: bytes) -> str | None:
    ifd = tiff_directory(data)
    if ifd is None:  # a first directory that does not parse is damage
        return None
    # Pillow's defaults for absent tags. In every file written on purpose all samples are alike, and their
    # count is what the photometric interpretation needs plus the extra samples (alpha) declared.
    bits, kinds = set(_values(ifd.get(258, 1))), set(_values(ifd.get(339, 1)))
    samples, photometric, compression = ((*_values(ifd.get(tag, default)), -1)[0] for tag, default in _TIFF_DEFAULTS)
    name, base = _PHOTOMETRIC.get(photometric, ("", -1))
    compressed = TiffImagePlugin.COMPRESSION_INFO.get(compression) or _TIFF_COMPRESSIONS.get(compression)
    if len(bits) != 1 or len(kinds) != 1 or base < 0 or compressed is None:
        return None
    (depth,), (kind,) = bits, kinds
    if depth not in _TIFF_BITS or kind not in _SAMPLE_FORMATS or (depth == 1 and base != 1):
        return None
    if base and samples != base + len(_values(ifd.get(338, ()))):
        return None
    return f"TIFF with {depth}-bit {_SAMPLE_FORMATS[kind]} samples, {samples} per pixel ({name}, {compressed})"


def _bmp_variant(data: bytes) -> str | None:
    header = int.from_bytes(data[14:18], "little")
    if header < 40 or len(data) < 54:
        return f"BMP with a {header}-byte header"
    bits, compression = int.from_bytes(data[28:30], "little"), int.from_bytes(data[30:34], "little")
    colours = int.from_bytes(data[46:50], "little")
    if bits not in _BMP_BITS or compression not in _BMP_COMPRESSION or (bits <= 8 and colours > 1 << bits):
        return None
    return f"BMP with {bits} bits per pixel and {_BMP_COMPRESSION[compression]} compression"


def _jpeg_variant(data: bytes) -> str | None:
    """From the first frame header (SOFn): its sample precision and number of components."""
    pos = 2
    while pos + 10 <= len(data) and data[pos] == 0xFF:
        marker, length = data[pos + 1], int.from_bytes(data[pos + 2 : pos + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            bits, components = data[pos + 4], data[pos + 9]
            return (
                f"JPEG with {bits}-bit samples, {components} components"
                if bits in (8, 12, 16) and 1 <= components <= 4
                else None
            )
        pos += 2 + length
    return None


def _values(value: object) -> tuple[int, ...]:
    """A TIFF tag's values (Pillow gives one value or a tuple of them), -1 for any that is no integer."""
    return tuple(v if isinstance(v, int) else -1 for v in (value if isinstance(value, tuple) else (value,)))
