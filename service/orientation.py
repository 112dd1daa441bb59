"""EXIF orientation: where each format keeps it, and turning pixels upright once.

Pillow's ``ImageOps.exif_transpose`` (what ComfyUI's LoadImage applies) is the
reference: it reads the orientation from the EXIF block (a PNG's eXIf chunk or,
failing that, the hex dump ImageMagick writes into a "Raw profile type exif"
text chunk; a WebP's EXIF chunk; a JPEG's APP1; a TIFF's first directory) and,
where that block has none, from the XMP packet's ``tiff:Orientation`` (a PNG's
"XML:com.adobe.xmp" text chunk, a WebP's XMP chunk), as photo editors write it.
Pillow turns a TIFF upright itself while loading it, so the orientation of a
Pillow-decoded image is read from the loaded image, never before.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import cv2
import numpy as np
from PIL import Image

ORIENTATION_TAG = 0x0112
RAW_PROFILE_KEY = "Raw profile type exif"
XMP_KEY = "XML:com.adobe.xmp"
# Pillow's own pattern (Image.getexif): the first tiff:Orientation, as an attribute or an element.
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')

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


def upright(pixels: np.ndarray, orientation: int, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """`pixels` as stored and their stored (w, h) -> shown upright, and the upright (w, h)."""
    if orientation not in _UPRIGHT:
        return pixels, size
    return _UPRIGHT[orientation](pixels), ((size[1], size[0]) if orientation >= 5 else size)


def exif_orientation(raw: bytes | None, xmp: bytes | None = None) -> int:
    """The orientation of a raw EXIF block (PNG eXIf, WebP EXIF), else of the XMP packet, else 1."""
    tag = None
    if raw is not None:
        try:
            exif = Image.Exif()
            exif.load(raw)
            tag = exif.get(ORIENTATION_TAG)
        except Exception:  # a damaged EXIF block costs its orientation, not the image
            tag = None
    if tag is None and xmp:
        match = _XMP_ORIENTATION.search(xmp)
        tag = None if match is None else match[2]
    try:
        return 1 if tag is None else int(tag)
    except (TypeError, ValueError):
        return 1


def png_orientation(exif: bytes | None, text: Mapping[str, str]) -> int:
    """A PNG's orientation as Pillow reads it: the eXIf chunk, else ImageMagick's raw profile text,
    else the XMP text chunk.

    The raw profile is "\\nexif\\n<length>\\n" and the EXIF block in hex lines; Pillow
    takes the lines from the fourth on. Its value, like the XMP packet, is one of the
    text chunks already read under the text caps, so a huge one costs nothing more.
    """
    xmp = text.get(XMP_KEY)
    packet = None if xmp is None else xmp.encode("utf-8", "replace")
    profile = text.get(RAW_PROFILE_KEY)
    if exif is None and profile is not None:
        try:
            exif = bytes.fromhex("".join(profile.split("\n")[3:]))
        except ValueError:  # not hex: Pillow fails on it too, we keep the image as stored
            return 1
    return exif_orientation(exif, packet)


def pillow_orientation(im: Image.Image) -> int:
    """The orientation Pillow reports for `im`, 1 when its EXIF cannot be read.

    Of a TIFF, read after loading: Pillow has turned it upright then and reports 1.
    """
    try:
        return int(im.getexif().get(ORIENTATION_TAG, 1))
    except Exception:  # a damaged EXIF block costs the orientation, not the image
        return 1
