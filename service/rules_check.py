"""`sinkwatch rules check [DIR|FILE]`: validate every rule file, one line per file.

Without DIR the rules folder the settings name (``SINKWATCH_RULES``, or
``rules`` in the config file ``SINKWATCH_CONFIG`` names) is checked, else the
shipped presets: the rules `run` would load. Each file is validated on its
own (so one broken or unreadable file does not hide the others), then the
folder as a set (duplicate names, a ``default`` rule). A FILE is validated on
its own. Exit status 0 when all is well, 1 otherwise; every error names the
file and the field.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service.errors import RuleError
from service.rules import Rule, load_rule_file, load_rules, parse_rule, rule_files
from service.settings import shared_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["check"], help="what to do with the rules (only 'check')")
    parser.add_argument(
        "directory",
        nargs="?",
        type=Path,
        metavar="DIR|FILE",
        help="rule folder (default: SINKWATCH_RULES or the config file's, else the shipped presets), or one rule file",
    )


def main(args: argparse.Namespace) -> int:
    directory = args.directory if args.directory is not None else shared_settings().rules
    if directory is not None and directory.is_file():
        return _check_file(directory)
    try:
        files = rule_files(directory)
    except RuleError as exc:
        print(f"FAIL {exc}")
        return 1
    if not files:
        print(f"FAIL {directory}: no rule files (*.toml)")
        return 1
    failures = 0
    for label, text in files:
        try:
            if isinstance(text, RuleError):
                raise text
            rule = parse_rule(text, file=label)
        except RuleError as exc:
            failures += 1
            print(f"FAIL {exc}")
            continue
        print(f"ok   {label}: {_summary(rule)}")
    if not failures:
        try:
            load_rules(directory)
        except RuleError as exc:
            failures += 1
            print(f"FAIL {exc}")
    where = directory or "presets"
    if failures:
        print(f"sinkwatch rules check: {failures} problem(s) in {where}", file=sys.stderr)
        return 1
    print(f"sinkwatch rules check: {len(files)} rule file(s) in {where} are valid", file=sys.stderr)
    return 0


def _check_file(path: Path) -> int:
    try:
        rule = load_rule_file(path)
    except RuleError as exc:
        print(f"FAIL {exc}")
        print(f"sinkwatch rules check: {path} is not a valid rule", file=sys.stderr)
        return 1
    print(f"ok   {path}: {_summary(rule)}")
    print(f"sinkwatch rules check: {path} is a valid rule (a folder of rules also needs a default)", file=sys.stderr)
    return 0


def _summary(rule: Rule) -> str:
    size = f"{rule.resize.width}x{rule.resize.height}"
    globs = ", ".join(rule.match) if rule.match else "(no globs)"
    return (
        f"{rule.name} {size} {rule.resize.mode}, priority {rule.priority}, match {globs}, "
        f"fingerprint {rule.fingerprint}"
    )
