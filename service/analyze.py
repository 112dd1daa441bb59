"""`sinkwatch analyze`: not built yet (issue 3)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "not yet: lands with issue 3"


def main(args: argparse.Namespace) -> int:
    print("sinkwatch analyze: not yet (issue 3)", file=sys.stderr)
    return 2
