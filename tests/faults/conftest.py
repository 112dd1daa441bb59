"""Fixtures of the fault, fuzz and soak suite (issue 8).

The suite abuses the real daemon (`tests.e2e.conftest.DaemonProcess`) and the
in-process runner. The tools it uses live beside this file, by topic: images
and writers (what a generator drops), presets (rule folders), outputs (what
the daemon published), readings (/metrics, logs, /proc) and tmpfs (disk
faults). Here are only the fixtures, and the counts each test records
(printed, written under its tmp_path, and repeated in a "sinkwatch fault
suite" section at the end of the pytest output).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.e2e.conftest import DaemonProcess
from tests.faults.images import Images
from tests.faults.tmpfs import Tmpfs

_COUNTS = pytest.StashKey[list[str]]()


@pytest.fixture(scope="session")
def images(photos: dict[str, np.ndarray]) -> Images:
    return Images(photos)


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    """Daemons a test started (append them); any still running at the end is stopped, then killed."""
    started: list[DaemonProcess] = []
    yield started
    for daemon in started:
        if daemon.proc is not None and daemon.proc.poll() is None:
            try:
                daemon.stop(timeout=60)
            except subprocess.TimeoutExpired:
                daemon.kill()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str, str], Tmpfs]]:
    """Mount tmpfs file systems under tmp_path: ``tmpfs("qfs", "4m")``; unmounted at teardown."""
    mounted: list[Tmpfs] = []

    def mount(name: str, size: str) -> Tmpfs:
        fs = Tmpfs(tmp_path / name)
        try:
            fs.mount(size)
        except (subprocess.CalledProcessError, OSError) as exc:
            pytest.fail(f"cannot mount a tmpfs here ({exc}); this suite needs root for its disk faults")
        mounted.append(fs)
        return fs

    yield mount
    for fs in reversed(mounted):
        fs.unmount()


@pytest.fixture
def counts(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., None]:
    """Record a test's counts: printed, written to tmp_path/counts.json, summarised at the end."""
    started = time.monotonic()

    def record(**values: object) -> None:
        values = {**values, "seconds": round(time.monotonic() - started, 1)}
        line = f"{request.node.nodeid}: " + ", ".join(f"{k}={v}" for k, v in values.items())
        request.config.stash.setdefault(_COUNTS, []).append(line)
        print(line)
        (tmp_path / "counts.json").write_text(json.dumps(values, default=str, indent=2), encoding="utf-8")

    return record


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    lines = config.stash.get(_COUNTS, [])
    if lines:
        terminalreporter.section("sinkwatch fault suite: counts")
        for line in lines:
            terminalreporter.write_line(line)
