"""Log lines: a library's `logging` warning comes out in the daemon's format (one JSON line), not as bare text."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

import pytest
from loguru import logger

from service.logs import configure_logging, last_word


def test_a_library_warning_is_one_json_line_with_its_logger_name(restored_logging: None) -> None:
    stream = io.StringIO()
    configure_logging(log_format="json", stream=stream)
    configure_logging(log_format="json", stream=stream)  # configured twice: still one line per record
    logging.getLogger("watchdog.observers.inotify").warning("queue_events() called when the thread is %s", "inactive")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1, lines
    record = json.loads(lines[0])["record"]
    assert record["message"] == "queue_events() called when the thread is inactive"
    assert record["level"]["name"] == "WARNING"
    assert record["extra"]["library"] == "watchdog.observers.inotify"


def test_library_debug_lines_stay_below_the_root_loggers_level(restored_logging: None) -> None:
    stream = io.StringIO()
    configure_logging(log_format="json", level="DEBUG", stream=stream)
    logging.getLogger("watchdog").debug("in-event")
    assert stream.getvalue() == ""


def test_a_python_warning_is_one_json_line_too() -> None:
    # In a process of its own: pytest records warnings itself.
    code = "import warnings; from service.logs import configure_logging; configure_logging(log_format='json'); "
    code += "warnings.warn('Callback with id 7 already exists for watch 3', RuntimeWarning)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, lines
    record = json.loads(lines[0])["record"]
    assert "RuntimeWarning: Callback with id 7 already exists for watch 3" in record["message"]
    assert record["level"]["name"] == "WARNING" and record["extra"]["library"] == "py.warnings"


def test_a_file_name_cannot_send_escapes_to_a_terminal(
    restored_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """Any byte but / and NUL may be in a file name; in a text log on a terminal, ESC [ 31 m turned it red."""
    stream = io.StringIO()
    configure_logging(log_format="text", stream=stream)
    logger.info("published {} -> {}", "esc\x1b[31mred\rback\x9b.png", "esc_[31mred.png")
    logger.warning("two lines\n\tand a tab")
    last_word("sinkwatch: watch/\x07bell.png: no such file")

    lines = stream.getvalue().splitlines()
    assert lines[0].endswith(" published esc\\x1b[31mred\\x0dback\\x9b.png -> esc_[31mred.png"), lines
    assert lines[1].endswith(" two lines") and lines[2] == "\tand a tab", lines
    assert capsys.readouterr().err == "sinkwatch: watch/\\x07bell.png: no such file\n"
    json_stream = io.StringIO()
    configure_logging(log_format="json", stream=json_stream)
    logger.info("published {}", "esc\x1b.png")
    assert json.loads(json_stream.getvalue())["record"]["message"] == "published esc\x1b.png", "JSON escapes it itself"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_a_log_line_takes_the_place_of_a_progress_line(restored_logging: None) -> None:
    """`process` ends its progress line with no newline; a log line was written on after it."""
    stream = Terminal()
    configure_logging(log_format="auto", stream=stream)
    stream.write("\r[3/40] published 3")
    logger.warning("rejected {}", "broken.png")

    shown = stream.getvalue()
    assert shown.startswith("\r[3/40] published 3\r\x1b[K") and shown.endswith(" rejected broken.png\n"), shown
