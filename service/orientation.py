"""EXIF orientation: where each format keeps it, and turning pixels upright once.

Pillow's ``ImageOps.exif_transpose`` (what ComfyUI's LoadImage applies) is the
reference: it reads the orientation from the EXIF block (a PNG's eXIf chunk or,
failing that, the hex dump ImageMagick writes into a "Raw profile type exif"
text chunk; a WebP's EXIF chunk; a JPEG's APP1; a TIFF's first directory).
Pillow turns a TIFF upright itself while loading it, so the orientation of a
Pillow-decoded image is read from the loaded image, never before.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import cv2
import numpy as np
from PIL import Image

ORIENTATION_TAG = 0x0112
RAW_PROFILE_KEY = "Raw profile type exif"

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


def exif_orientation(raw: bytes) -> int:
    """The orientation tag of a raw EXIF block (PNG eXIf, WebP EXIF), 1 if absent or unreadable."""
    try:
        exif = Image.Exif()
        exif.load(raw)
        return int(exif.get(ORIENTATION_TAG, 1))
    except Exception:  # a damaged EXIF block costs the orientation, not the image
        return 1


def png_orientation(exif: bytes | None, text: Mapping[str, str]) -> int:
    """A PNG's orientation as Pillow reads it: the eXIf chunk, else ImageMagick's raw profile text.

    The raw profile is "\\nexif\\n<length>\\n" and the EXIF block in hex lines; Pillow
    takes the lines from the fourth on. Its value is one of the text chunks already
    read under the text caps, so a huge one costs nothing more.
    """
    if exif is not None:
        return exif_orientation(exif)
    profile = text.get(RAW_PROFILE_KEY)
    if profile is None:
        return 1
    try:
        raw = bytes.fromhex("".join(profile.split("\n")[3:]))
    except ValueError:  # not hex: Pillow fails on it too, we keep the image as stored
        return 1
    return exif_orientation(raw)


def pillow_orientation(im: Image.Image) -> int:
    """The orientation Pillow reports for `im`, 1 when its EXIF cannot be read.

    Of a TIFF, read after loading: Pillow has turned it upright then and reports 1.
    """
    try:
        return int(im.getexif().get(ORIENTATION_TAG, 1))
    except Exception:  # a damaged EXIF block costs the orientation, not the image
        return 1
