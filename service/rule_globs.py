"""``match`` globs of rule files, compiled to regular expressions.

Kept apart from the rule models because the glob grammar is its own small
language: the models only ask whether a glob compiles (to refuse a bad rule
file) and whether it matches a path (to select a rule).

Globs are matched against the path relative to the watch folder,
``/``-separated and case-insensitive: ``*`` and ``?`` stay inside one folder,
``**`` (a whole segment) spans any number of folders, ``[abc]`` / ``[a-z]`` /
``[!abc]`` are character classes (never matching ``/``; a ``]`` right after
``[`` or ``[!`` is a member). Braces are refused rather than taken literally:
``*.{png,jpg}`` is written as two globs.

Rule selection runs on the daemon's main thread for every file, so matching
must stay cheap for any glob and any file name: the regular expression is
built like CPython's ``fnmatch.translate`` builds its own (see
:func:`_without_backtracking`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

# ``*``: any characters of one folder name; ``?``: one of them.
_NAME_CHARS = "[^/]*"
_NAME_CHAR = "[^/]"
# ``**`` before more segments: whole folders. The possessive ``++`` never gives back part of a name.
_FOLDERS = "(?:[^/]++/)*"
# ``**`` as the last segment: everything below.
_ANYTHING = ".*"


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
    items: list[str | None] = []  # None: a '**' segment
    for index, segment in enumerate(segments):
        if segment == "**":
            items.append(None)
            continue
        if "**" in segment:
            raise ValueError(f"'**' must be a whole folder name (as in 'a/**/b'): {glob!r}")
        last = index == len(segments) - 1
        items.append(_segment_regex(segment, glob) + ("" if last else "/"))
    source = _without_backtracking(items, skip=_FOLDERS, rest=_ANYTHING)
    try:
        # DOTALL: a file name may contain a newline, and '**' still spans it.
        return re.compile(source, re.IGNORECASE | re.DOTALL)
    except re.error as exc:  # every part is escaped, so this would be a bug here; still a clear rule error
        raise ValueError(f"glob {glob!r} does not compile: {exc}") from None


def _without_backtracking(items: Sequence[str | None], *, skip: str, rest: str) -> str:
    """Join fixed parts (regexes) and wildcards (None, matching ``skip``) into one regex.

    A plain translation (``skip`` for each wildcard) backtracks through every
    way of splitting the text among the wildcards: ``*a*a*a*a*a*a*b.png``
    against a long name of ``a``s takes seconds, a few more stars hours.
    Between two wildcards, though, the earliest place where the fixed part
    matches is as good as any later one (each fixed part has a fixed length,
    and the next wildcard absorbs whatever lies between), so each such
    ``wildcard + fixed`` is an atomic group ``(?>skip?fixed)`` that is tried
    once and never re-entered. Only the last wildcard backtracks, because the
    end must line up; a trailing wildcard is ``rest``. This is what CPython's
    ``fnmatch.translate`` does; here it serves twice: for ``*`` inside a folder
    name (fixed parts: characters) and for ``**`` across folders (fixed parts:
    whole folders).
    """
    out: list[str] = []
    i = 0
    while i < len(items) and (item := items[i]) is not None:
        out.append(item)
        i += 1
    while i < len(items):
        while i < len(items) and items[i] is None:  # '**' after '**' adds nothing
            i += 1
        if i == len(items):
            out.append(rest)
            break
        fixed: list[str] = []
        while i < len(items) and (item := items[i]) is not None:
            fixed.append(item)
            i += 1
        body = "".join(fixed)
        out.append(skip + body if i == len(items) else f"(?>{skip}?{body})")
    return "".join(out)


def _segment_regex(segment: str, glob: str) -> str:
    items: list[str | None] = []  # None: a '*'
    i = 0
    while i < len(segment):
        char = segment[i]
        if char == "*":
            items.append(None)
        elif char == "?":
            items.append(_NAME_CHAR)
        elif char == "[":
            regex, i = _char_class(segment, i, glob)
            items.append(regex)
            continue
        elif char == "]":
            raise ValueError(f"unmatched ']' in glob {glob!r}")
        elif char in "{}":
            raise ValueError(_brace_message(glob))
        else:
            items.append(re.escape(char))
        i += 1
    return _without_backtracking(items, skip=_NAME_CHARS, rest=_NAME_CHARS)


def check_name_glob(glob: str) -> None:
    """Refuse in an ``include``/``ignore`` glob what ``fnmatch`` would take silently.

    Those globs keep ``fnmatch``'s grammar (``*`` spans folders there), which
    reads braces literally and turns a reversed range into a class that
    matches nothing, so ``[z-a]*.png`` or ``*.{png,jpg}`` would select no file
    without a word. They are matched lower-cased, so ``[Z-a]`` is reversed too.
    Globs joined by commas (``*.png,*.jpg``, as a list is written on one line)
    or a glob with a space at an end are a list mistaken for one glob; a comma
    in a name (``a cat, sitting_*.png``, ``*[,]*``) is a glob of its own.
    """
    lowered = glob.lower()
    outside = []  # the glob without its [...] classes
    i = 0
    while i < len(lowered):
        if lowered[i] in "{}":
            raise ValueError(_brace_message(glob))
        if lowered[i] != "[":
            outside.append(lowered[i])
            i += 1
            continue
        try:
            _regex, i = _char_class(lowered, i, glob)
        except _Unclosed:  # fnmatch reads an unclosed '[' literally, and so may the user
            outside.append("[")
            i += 1
    parts = [part.strip() for part in "".join(outside).split(",")]
    if glob != glob.strip() or (len(parts) > 1 and all("*" in part or "." in part for part in parts)):
        raise ValueError(
            f"glob {glob!r} looks like a list written as one glob (commas between globs, or a space at an end): "
            "give each glob on its own (the flag once per glob, or a list in the config file)"
        )


class _Unclosed(ValueError):
    """A ``[`` without its ``]``."""


def _brace_message(glob: str) -> str:
    """Why braces are refused, with the globs to write instead when one ``{a,b}`` says it plainly."""
    example = ["*.png", "*.jpg"]
    opening, closing = glob.find("{"), glob.find("}")
    choices = [choice for choice in glob[opening + 1 : closing].split(",") if choice]
    if glob.count("{") == glob.count("}") == 1 and opening < closing and len(choices) > 1:
        example = [glob[:opening] + choice + glob[closing + 1 :] for choice in choices]
    shown = ", ".join(f'"{choice}"' for choice in example)
    return (
        f"braces are not supported in glob {glob!r}: write one glob per alternative, "
        f"e.g. {shown} (a literal brace: [{{] or [}}])"
    )


def _char_class(segment: str, start: int, glob: str) -> tuple[str, int]:
    """The class whose ``[`` is at ``start``: its regex, and the index just after its ``]``.

    Every member is escaped, so what regular expressions read as set syntax
    (``[``, ``&&``, ``--``, ``~~``, ``||``, ``^``) is literal here.
    """
    first = start + 1
    negate = segment[first : first + 1] == "!"
    if negate:
        first += 1
    # The first member may be ']' itself: the class ends at the next ']' after it.
    end = segment.find("]", first + 1) if first < len(segment) else -1
    if end < 0:
        raise _Unclosed(f"unclosed '[' in glob {glob!r}")
    body = segment[first:end]
    members: list[str] = []
    j = 0
    while j < len(body):
        low = body[j]
        if j + 2 < len(body) and body[j + 1] == "-":
            high = body[j + 2]
            if low > high:
                raise ValueError(f"reversed range '{low}-{high}' in glob {glob!r} (write the lower end first)")
            members.append(f"{re.escape(low)}-{re.escape(high)}")
            j += 3
        else:
            members.append(re.escape(low))
            j += 1
    # A negated class must not match '/' either: '?' and '*' do not.
    regex = "[^" + "".join(members) + "/]" if negate else "[" + "".join(members) + "]"
    return regex, end + 1
