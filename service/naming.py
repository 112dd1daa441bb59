"""Output names: a source's relative path made into one safe, bounded file-name stem.

The stem becomes ``QUEUE/<stem>.png``, ``QUEUE/matrix/<stem>.matrix.png`` and
``QUEUE/matrix/<stem>.json``, so it must be a single harmless path component on
Linux, macOS and Windows (the queue is often ComfyUI's ``input/`` on a shared
drive). Everything here is a pure function of its arguments: the same source
path always gives the same name.
"""

from __future__ import annotations

import hashlib
import unicodedata

# Bytes, not characters: the file-system limit is 255 bytes per name, and the
# longest suffix added to a stem is ".matrix.png".
DEFAULT_MAX_LENGTH = 120
MIN_MAX_LENGTH = 24
MAX_MAX_LENGTH = 240
FALLBACK = "image"
FOLDER_JOINER = "__"

# Forbidden on Windows (and ":" is a separator for macOS Finder); "/" and "\\" are separators.
_FORBIDDEN = frozenset('<>:"|?*\\/')
# Control, format (bidi overrides, zero-width), lone surrogates (undecodable bytes), line/paragraph separators.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {f"{device}{digit}" for device in ("COM", "LPT") for digit in "0123456789¹²³"}
)


def safe_stem(relpath: str, *, max_length: int = DEFAULT_MAX_LENGTH) -> str:
    """The output stem for a source given by its POSIX relative path.

    ``"sub/dir/photo 1.png"`` gives ``"sub__dir__photo 1"``. Over `max_length`
    UTF-8 bytes the stem is cut and ends in ``-`` plus 8 hex digits of a hash
    of the full stem, so long names that share a beginning stay apart.

    >>> safe_stem("renders/../CON.png")
    'renders__CON'
    >>> safe_stem("..")
    'image'
    """
    _check_max_length(max_length)
    *folders, filename = relpath.split("/")
    parts = [_clean(folder) for folder in folders]
    parts.append(_clean(_drop_suffix(filename)))
    stem = FOLDER_JOINER.join(part for part in parts if part) or FALLBACK
    if _is_reserved(stem):
        stem = "_" + stem
    if len(stem.encode("utf-8")) > max_length:
        digest = hashlib.sha256(stem.encode("utf-8")).hexdigest()[:8]
        stem = _cut(stem, max_length - len(digest) - 1) + "-" + digest
    return stem


def disambiguated(stem: str, relpath: str, *, counter: int = 0, max_length: int = DEFAULT_MAX_LENGTH) -> str:
    """`stem` made unique to `relpath`: ``stem-<first 8 hex of sha256(relpath)>``.

    A `counter` above 1 adds ``-<counter>`` for the rare case where even that
    name is taken. The result stays within `max_length` bytes.
    """
    _check_max_length(max_length)
    suffix = "-" + hashlib.sha256(relpath.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    if counter > 1:
        suffix += f"-{counter}"
    return _cut(stem, max_length - len(suffix.encode("utf-8"))) + suffix


def _check_max_length(max_length: int) -> None:
    if not MIN_MAX_LENGTH <= max_length <= MAX_MAX_LENGTH:
        raise ValueError(f"max_length must be {MIN_MAX_LENGTH}..{MAX_MAX_LENGTH} bytes, got {max_length}")


def _drop_suffix(filename: str) -> str:
    dot = filename.rfind(".")
    return filename[:dot] if dot > 0 else filename


def _clean(part: str) -> str:
    """One path component made safe; empty when nothing usable is left."""
    text = unicodedata.normalize("NFC", part)
    text = "".join(
        "_" if char in _FORBIDDEN or unicodedata.category(char) in _UNSAFE_CATEGORIES else char for char in text
    )
    while ".." in text:
        text = text.replace("..", ".")
    # Leading dots hide a file (and ".." climbs); Windows drops trailing dots and spaces.
    return text.strip(" .")


def _is_reserved(stem: str) -> bool:
    # Windows treats "CON.anything" and "CON " as the device too.
    return stem.split(".", 1)[0].strip(" ").upper() in _RESERVED


def _cut(text: str, limit: int) -> str:
    """The longest prefix of `text` within `limit` UTF-8 bytes (never half a character)."""
    encoded = text.encode("utf-8")
    if len(encoded) <= limit:
        return text
    return encoded[:limit].decode("utf-8", "ignore")
