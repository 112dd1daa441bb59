"""An upgrade on disk under a running daemon: it stops with exit 75 to be started again on the new code.

The daemon runs from a copy of the code, which the test then changes as `pip install` would: a worker started
after that would load the new modules beside the old main process (a changed signature killed every new worker
and its images were rejected as crashes, for good).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.conftest import wait_for
from tests.e2e.conftest import REPO, DaemonProcess, check_outputs_complete, small_photo, write_photo


def test_a_daemon_whose_code_is_replaced_on_disk_stops_with_75_and_loses_nothing(tmp_path: Path) -> None:
    code = tmp_path / "installed"
    for package in ("core", "service", "rules"):
        shutil.copytree(REPO / package, code / package, ignore=shutil.ignore_patterns("__pycache__"))
    watch, queue = tmp_path / "watch", tmp_path / "queue"
    watch.mkdir()
    daemon = DaemonProcess(watch, queue, tmp_path / "daemon.log", env={"PYTHONPATH": str(code)}).start()
    try:
        write_photo(watch / "before.png", small_photo(0))
        wait_for(lambda: (queue / "before.png").is_file(), timeout=60)
        runner = code / "service" / "runner.py"
        upgraded = runner.with_suffix(".new")
        upgraded.write_text(runner.read_text() + "\n# the next release\n")
        upgraded.replace(runner)  # as pip installs a file: a new one in its place
        assert daemon.proc is not None
        assert daemon.proc.wait(timeout=30) == 75
    finally:
        daemon.stop()
    assert any("changed on disk" in message for message in daemon.messages())
    assert not (queue / "rejected").exists() or not list((queue / "rejected").iterdir())
    check_outputs_complete(queue)
