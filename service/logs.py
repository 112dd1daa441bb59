"""Log setup with loguru: readable lines on a terminal, JSON lines for journald and containers."""

from __future__ import annotations

import logging
import re
import sys
from typing import TYPE_CHECKING, TextIO

from loguru import logger

if TYPE_CHECKING:
    from loguru import Record

# A file name may hold any byte but / and NUL: on a terminal, an escape in one (ESC [ 31 m) would be obeyed.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_TEXT_FORMAT = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> <level>{level: <7}</level> {extra[_printable]}\n{exception}"
)

_CLEAR_LINE = "\r\x1b[K"

# Whether the log is a stream of JSON lines, where a last word must be one of them too.
_json = False


def configure_logging(*, log_format: str = "auto", level: str = "INFO", stream: TextIO | None = None) -> None:
    """Route every log line to `stream` (stderr by default) in the chosen format.

    ``auto`` means text when the stream is a terminal and JSON lines otherwise,
    which is what journald, Docker and a log shipper want.
    """
    stream = stream if stream is not None else sys.stderr
    as_json = log_format == "json" or (log_format == "auto" and not stream.isatty())
    global _json
    _json = as_json
    logger.remove()
    if as_json:
        logger.add(stream, level=level, serialize=True, backtrace=False, diagnose=False)
    else:
        terminal = stream.isatty()
        line = _terminal_format if terminal else _text_format
        logger.add(stream, level=level, format=line, colorize=terminal, backtrace=False, diagnose=False)
    # Libraries log through `logging` (watchdog's emitter, for one): their warnings would reach stderr
    # as bare text, breaking a stream of JSON lines. They go through loguru, in the same format.
    root = logging.getLogger()
    if not any(isinstance(handler, _ToLoguru) for handler in root.handlers):
        root.addHandler(_ToLoguru())
    # So do Python warnings (watchdog's RuntimeWarning for a subfolder moved out and back in), through `logging`.
    logging.captureWarnings(True)


def _text_format(record: Record) -> str:
    record["extra"]["_printable"] = printable(record["message"])
    return _TEXT_FORMAT


def _terminal_format(record: Record) -> str:
    # `process` draws its progress on a line it ends with no newline: a log line takes that line's place
    # (erased first), and the progress is drawn again below it.
    return _CLEAR_LINE + _text_format(record)


def printable(text: str) -> str:
    """`text` with its control characters (but newline and tab) shown as escapes, ``\\x1b``."""
    return _CONTROL.sub(lambda found: f"\\x{ord(found.group()):02x}", text)


class _ToLoguru(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.bind(library=record.name).opt(exception=record.exc_info).log(level, record.getMessage())


def json_lines() -> bool:
    """Whether the log is a stream of JSON lines."""
    return _json


def last_word(message: str) -> None:
    """What ends a command (a configuration error): an ERROR line when the log is JSON, else a plain line."""
    if _json:
        logger.error(message)
    else:
        print(printable(message), file=sys.stderr)
