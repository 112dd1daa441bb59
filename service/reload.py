"""Rule hot-reload: edited rule files (checked every second) or SIGHUP load the rules again.

Rules that fail to load are logged and counted, and the last good ones stay in
force: only the first load at start-up may stop the daemon. That holds for any
exception while loading, not only a :class:`RuleError`: a bug in rule loading
met by an odd rule file must not take the running daemon down with it.
"""

from __future__ import annotations

import math
from pathlib import Path

from loguru import logger

from service import __version__
from service.errors import RuleError
from service.metrics import Metrics
from service.rules import RuleSet, is_rule_file, load_rules

CHECK_INTERVAL = 1.0

Signature = tuple[tuple[str, int, int, int, int], ...]


class RuleReloader:
    """Watches one rule folder (None: the shipped presets, which never change)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.requested = False
        self.signature: Signature = ()
        self.next_check = -math.inf

    def load(self) -> RuleSet:
        """The first load; its RuleError is a configuration error."""
        signature = self._read_signature()  # before reading: an edit made meanwhile is then a change
        rules = load_rules(self.directory)
        self.signature = signature
        return rules

    def request(self) -> None:
        """Reload at the next poll even if no file changed (SIGHUP); safe in a signal handler."""
        self.requested = True

    def poll(self, now: float, *, metrics: Metrics) -> RuleSet | None:
        """The rules loaded again when a check is due and found a change or a request; else None."""
        if now < self.next_check and not self.requested:
            return None
        self.next_check = now + CHECK_INTERVAL
        signature = self._read_signature()
        if not self.requested and signature == self.signature:
            return None
        self.requested = False
        self.signature = signature
        try:
            rules = load_rules(self.directory)
        except RuleError as exc:
            metrics.rule_reload_failures.inc()
            metrics.rules_reload_ok.set(0)
            logger.bind(file=exc.file, field=exc.field).error("rules not reloaded, keeping the last good ones: {}", exc)
            return None
        except Exception as exc:  # any other: see the module docstring; logged with its traceback
            metrics.rule_reload_failures.inc()
            metrics.rules_reload_ok.set(0)
            where = logger.bind(file=str(self.directory) if self.directory else "presets", field=None)
            where.opt(exception=exc).error(
                "rules not reloaded (unexpected {}), keeping the last good ones: {}", type(exc).__name__, exc
            )
            return None
        record_rules(metrics, rules)
        logger.info("rules reloaded: {} (fingerprint {})", ", ".join(rules.names), rules.fingerprint)
        return rules

    def _read_signature(self) -> Signature:
        if self.directory is None:
            return ()
        try:
            files = sorted(path for path in self.directory.iterdir() if is_rule_file(path.name))
            stats = [(path.name, path.stat()) for path in files]
        except OSError:
            return (("<unreadable>", 0, 0, 0, 0),)
        # The inode too: an atomic replace of the same size within one mtime tick is still a change. And the
        # ctime: a file that could not be read loads once its owner or mode is mended, with no edit.
        return tuple((name, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size) for name, st in stats)


def record_rules(metrics: Metrics, rules: RuleSet) -> None:
    """Show the rules in force: a series per rule, how many, and their fingerprint."""
    for name in rules.names:
        metrics.add_rule(name)
    metrics.rules_loaded.set(len(rules.names))
    metrics.rules_reload_ok.set(1)
    metrics.set_build_info(__version__, rules.fingerprint)
