"""``match`` globs of rule files, compiled to regular expressions.

Kept apart from the rule models because the glob grammar is its own small
language: the models only ask whether a glob compiles (to refuse a bad rule
file) and whether it matches a path (to select a rule).

Globs are matched against the path relative to the watch folder,
``/``-separated and case-insensitive: ``*`` and ``?`` stay inside one folder,
``**`` (a whole segment) spans any number of folders, ``[abc]`` / ``[!abc]``
are character classes.
"""

from __future__ import annotations

import re
from functools import lru_cache


@lru_cache(maxsize=1024)
def compile_glob(glob: str) -> re.Pattern[str]:
    """The regular expression of a ``match`` glob (see the module docstring); ValueError if malformed."""
    if not glob:
        raise ValueError("a glob must not be empty")
    if "\\" in glob:
        raise ValueError(f"use '/' between folders, not '\\\\': {glob!r}")
    if glob.startswith("/"):
        raise ValueError(f"globs are relative to the watch folder, not absolute: {glob!r}")
    segments = glob.split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        raise ValueError(f"empty, '.' or '..' folder in glob {glob!r}")
    parts: list[str] = []
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == "**":
            parts.append(".*" if last else "(?:[^/]+/)*")
            continue
        if "**" in segment:
            raise ValueError(f"'**' must be a whole folder name (as in 'a/**/b'): {glob!r}")
        parts.append(_segment_regex(segment, glob) + ("" if last else "/"))
    return re.compile("".join(parts), re.IGNORECASE)


def _segment_regex(segment: str, glob: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(segment):
        char = segment[i]
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = segment.find("]", i + 2 if segment[i + 1 : i + 2] in ("!", "]") else i + 1)
            if end < 0:
                raise ValueError(f"unclosed '[' in glob {glob!r}")
            body = segment[i + 1 : end]
            negate = body.startswith("!")
            body = body[1:] if negate else body
            if not body:
                raise ValueError(f"empty character class in glob {glob!r}")
            out.append("[" + ("^" if negate else "") + body.replace("\\", "\\\\").replace("^", "\\^") + "]")
            i = end
        elif char == "]":
            raise ValueError(f"unmatched ']' in glob {glob!r}")
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)
