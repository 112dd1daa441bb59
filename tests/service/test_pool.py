"""The worker pool: its processes, which a Ctrl-C in the terminal reaches too, and its temp folder."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from service.pool import WorkerPool
from service.rules import load_rules
from service.runner import Job
from tests.conftest import photo_file


def coffee_job(tmp_path: Path) -> Job:
    source = tmp_path / "coffee.png"
    shutil.copyfile(photo_file("coffee"), source)
    return Job(source=source, key=source.name, name="coffee", rule=load_rules(None).get("default"),
               queue=tmp_path / "queue", max_bytes=1 << 30, max_pixels=1 << 30)  # fmt: skip


def test_a_ctrl_c_while_a_worker_starts_leaves_it_working_and_the_daemons_mask_as_it_was(tmp_path: Path) -> None:
    job = coffee_job(tmp_path)
    pool = WorkerPool(1)
    try:
        future = pool.submit(job)
        # Just spawned: the worker is still starting Python and importing numpy and OpenCV.
        [worker] = list(pool._executor._processes)
        os.kill(worker, signal.SIGINT)
        outcome = future.result(timeout=120)
    finally:
        pool.close()
    assert outcome.status == "published" and (tmp_path / "queue" / "coffee.png").is_file()
    assert not {signal.SIGINT, signal.SIGTERM, signal.SIGHUP} & signal.pthread_sigmask(signal.SIG_BLOCK, set())


def test_the_oom_killer_is_offered_a_worker_before_the_daemon(tmp_path: Path) -> None:
    job = coffee_job(tmp_path)
    own = Path("/proc/self/oom_score_adj").read_text()
    pool = WorkerPool(1)
    try:
        assert pool.submit(job).result(timeout=120).status == "published"
        [worker] = list(pool._executor._processes)
        assert int(Path(f"/proc/{worker}/oom_score_adj").read_text()) == 500
    finally:
        pool.close()
    assert Path("/proc/self/oom_score_adj").read_text() == own, "the daemon's own score changed"


def test_a_pool_removes_the_folders_of_pools_whose_daemon_was_killed_and_a_closed_one_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ended = subprocess.Popen(["true"])  # a pid whose process is gone, as a daemon killed with SIGKILL
    ended.wait()
    stale = tmp_path / f"sinkwatch-workers-{ended.pid}-x1"
    live = tmp_path / f"sinkwatch-workers-{os.getppid()}-x2"  # another sinkwatch, running
    for folder in (stale, live):
        folder.mkdir()
        (folder / "123.stderr").write_bytes(b"")
    workers = WorkerPool(1)
    assert not stale.exists() and live.exists() and workers.spool.parent == tmp_path
    workers.close()
    assert not workers.spool.exists()


def test_a_worker_started_by_a_daemon_from_before_the_temp_folder_still_starts() -> None:
    # Upgraded on disk under a running older daemon: its new workers load this code, and it calls with one argument.
    script = "import os; from service import pool; pool.init_worker(os.getppid()); print(pool._codec_messages)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (0, "None\n", "")
