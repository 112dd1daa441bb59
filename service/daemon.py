"""`sinkwatch run`: not built yet (issue 4)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "not yet: lands with issue 4"


def main(args: argparse.Namespace) -> int:
    print("sinkwatch run: not yet (issue 4)", file=sys.stderr)
    return 2
