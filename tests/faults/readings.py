"""Readings of a running daemon: its /metrics and /healthz, its JSON log, and /proc."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import DaemonProcess


def metric(daemon: DaemonProcess, name: str, **labels: str) -> float:
    """One sample of the daemon's /metrics; a series that does not exist fails the test.

    Reading a missing series as 0 would let `metric(...) == 0` pass for a renamed metric or label. The
    service creates every series these tests read (each known label value) before the first scrape.
    """
    status, text = daemon.get("/metrics")
    assert status == 200, f"/metrics answered {status}"
    return metric_in(text, name, **labels)


def metric_in(text: str, name: str, **labels: str) -> float:
    same_name: list[dict[str, str]] = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name != name:
                continue
            if all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
            same_name.append(sample.labels)
    raise AssertionError(f"/metrics has no series {name} with labels {labels}; the series of {name}: {same_name}")


def poll(predicate: Callable[[], object], *, timeout: float) -> bool:
    """Like wait_for, but running out of time is an answer (False), not a failure."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def health(daemon: DaemonProcess) -> int:
    try:
        return daemon.get("/healthz")[0]
    except OSError:
        return 0


def log_records(log: Path) -> list[dict[str, Any]]:
    """The JSON log records of one daemon log (a line cut by kill -9 is skipped)."""
    out = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            out.append(json.loads(line)["record"])
    return out


def published_records(log: Path) -> list[dict[str, Any]]:
    """The "published ..." log records (one per publication), oldest first."""
    return [r for r in log_records(log) if str(r["message"]).startswith("published ")]


def proc_status(pid: int) -> dict[str, int]:
    """RSS (kB), open fds and threads of a live process."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {
        "rss_kb": int(fields["VmRSS"].split()[0]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": len(os.listdir(f"/proc/{pid}/task")),
    }


def children(pid: int) -> list[int]:
    """Direct children of `pid` (the worker processes of a daemon)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
