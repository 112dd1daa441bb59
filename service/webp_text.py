"""ComfyUI's text in a WebP: the prompt and the workflow, kept as EXIF strings.

A PNG carries them as text chunks. ComfyUI's SaveAnimatedWEBP (and the nodes
that copy it) writes the prompt as EXIF Model (0x0110) ``prompt:{json}`` and
each entry of the workflow's extra info from Make (0x010F) downwards as
``workflow:{json}``: read back, they are the same text a PNG of that job holds,
under the same caps.
"""

from __future__ import annotations

from PIL import Image

from service.png_chunks import COMFYUI_TEXT_KEYS, TEXT_TOTAL_LIMIT, TEXT_VALUE_LIMIT


def comfyui_text(exif: bytes | None) -> tuple[dict[str, str], tuple[str, ...]]:
    """The ``prompt`` and ``workflow`` strings of a raw EXIF block, capped as PNG text is, and the keys left
    out for being over the caps; a damaged block has none."""
    if not exif:
        return {}, ()
    try:
        tags = Image.Exif()
        tags.load(exif)
        values = [value for _tag, value in sorted(tags.items(), reverse=True) if isinstance(value, str)]
    except Exception:  # a damaged EXIF block costs its text, not the image
        return {}, ()
    text: dict[str, str] = {}
    left_out: list[str] = []
    total = 0
    for value in values:
        key, colon, rest = value.partition(":")
        if not colon or key not in COMFYUI_TEXT_KEYS or key in text or key in left_out:
            continue
        if len(rest) > TEXT_VALUE_LIMIT or total + len(rest) > TEXT_TOTAL_LIMIT:
            left_out.append(key)
            continue
        text[key] = rest
        total += len(rest)
    return text, tuple(left_out)
