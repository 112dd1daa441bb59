"""The ``sinkwatch`` command line: ``run``, ``process``, ``analyze``, ``rules check``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``main(args) -> int``; this module only wires them together and turns a
configuration error into a clear message and exit code 2, and a condition that
may pass (a full or read-only disk at start) into one and exit code 75.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Sequence

from service import __version__
from service.errors import ConfigError, FolderBusy, SinkwatchError, Stopped
from service.logs import last_word

# sysexits.h EX_TEMPFAIL: not the settings' fault, starting again later may work. The systemd unit's
# Restart=on-failure restarts it, while exit 2 (RestartPreventExitStatus=2) stays down until fixed.
EX_TEMPFAIL = 75

# name -> (module, one-line help); modules are imported only when chosen.
COMMANDS = {
    "run": ("service.daemon", "run the daemon: watch, clean, publish (until SIGTERM/SIGINT)"),
    "process": ("service.batch", "one-shot: clean FILEs or folders into the queue, then exit"),
    "analyze": ("service.analyze", "scores and Matrix Vision of one image, for tuning a rule"),
    "rules": ("service.rules_check", "validate rule files: 'sinkwatch rules check [DIR]'"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sinkwatch",
        description=(
            "Frequency hygiene for Wan I2V start frames: resize, find the attention "
            "sinks (Matrix Vision), blur only there, publish to the I2V queue."
        ),
    )
    parser.add_argument("--version", action="version", version=f"sinkwatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module_name).add_arguments(command)
        command.set_defaults(module=module_name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(importlib.import_module(args.module).main(args))
    except FolderBusy as exc:
        return _may_pass(exc)
    except ConfigError as exc:
        last_word(f"sinkwatch: {exc}")
        return 2
    except SinkwatchError as exc:
        if not exc.transient:
            raise
        return _may_pass(exc)
    except KeyboardInterrupt as exc:
        return 128 + (exc.signum if isinstance(exc, Stopped) else signal.SIGINT)
    except BrokenPipeError:
        # The reader of stdout went away (`| head -1`): nothing to say, and nowhere to say it. Python's own
        # recipe: stdout to /dev/null, or the flush at exit fails again with a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _may_pass(exc: SinkwatchError) -> int:
    last_word(f"sinkwatch: {exc} (this may pass: try again later)")
    return EX_TEMPFAIL
