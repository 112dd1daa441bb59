"""Hazards to the daemon's promise (never lose, corrupt or double-process an image; never touch the
source folder): each test here drives the real daemon on real temp folders into a moment the other
end-to-end tests do not reach, and checks what a user would see.

- a worker process dies while the daemon is idle (OOM killer, segfault): the next image must still go out;
- a worker dies on one image while a good one is in flight beside it: only the culprit may be rejected;
- a source is rewritten while its old content is being processed: the new content must be published;
- a `run --once` whose retried source is deleted meanwhile must end;
- a state folder inside the watch folder must not write into the watch folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from concurrent.futures import Future
from pathlib import Path

import pytest

from service.engine import Engine
from service.pool import WorkerPool
from service.runner import Job, Outcome, process_job
from service.settings import Settings
from tests.conftest import load_photo, wait_for
from tests.e2e.conftest import (
    DaemonProcess,
    InProcessDaemon,
    check_outputs_complete,
    check_watch_unchanged,
    copy_rules,
    png_bytes,
    run_sinkwatch,
    small_photo,
    snapshot,
    write_photo,
)

# A large output keeps a worker busy for a second or more after a small source is decoded:
# the window in which the tests below make something happen.
SLOW_RULE = 'name = "slow"\nmatch = ["{glob}"]\npriority = 100\n[resize]\nwidth = {side}\nheight = {side}\n'


def slow_rules(folder: Path, glob: str, *, side: int) -> Path:
    """The shipped presets plus a rule giving files matching `glob` a `side` x `side` output."""
    copy_rules(folder, width=256, height=144)
    (folder / "slow.toml").write_text(SLOW_RULE.format(glob=glob, side=side), encoding="utf-8")
    return folder


def sidecar_sha(queue: Path, stem: str) -> str | None:
    """The source hash the published sidecar of `stem` names, None while there is none."""
    try:
        card = json.loads((queue / "matrix" / f"{stem}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return str(card["source"]["sha256"])


def worker_pids(engine: Engine) -> list[int]:
    """The pids of the pool's live worker processes (the executor keeps them private)."""
    executor = engine.pool._executor  # no public way to find the workers
    return [pid for pid, process in (executor._processes or {}).items() if process.is_alive()]


def bytes_read(pid: int) -> int:
    """What process `pid` has read so far (files and pipes), from /proc."""
    for line in Path(f"/proc/{pid}/io").read_text(encoding="ascii").splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/io has no rchar line")


# -- a worker process dies -------------------------------------------------------------------------


def test_a_worker_killed_while_the_daemon_is_idle_does_not_stop_the_next_image(folders: tuple[Path, Path]) -> None:
    watch, queue = folders
    settings = Settings(watch=watch, queue=queue, workers=1, metrics_port=0, settle_seconds=0.3, rescan_interval=3600)
    with InProcessDaemon(settings) as running:
        write_photo(watch / "first.png", small_photo(0))
        wait_for((queue / "first.png").is_file, timeout=60)
        pids = wait_for(lambda: worker_pids(running.daemon.engine), timeout=10)
        assert isinstance(pids, list)
        # The OOM killer (or a codec segfault) takes the idle worker: the executor is now broken.
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        pool = running.daemon.pool
        wait_for(lambda: not pool.alive() or pool.restarts > 0, timeout=10)  # the death was noticed

        write_photo(watch / "second.png", small_photo(1))
        before = snapshot(watch)
        wait_for(
            lambda: (queue / "second.png").is_file() or running.errors or not running.thread.is_alive(), timeout=60
        )
        assert not running.errors, f"the daemon died on the next image: {running.errors[0]!r}"
        assert (queue / "second.png").is_file()
    check_outputs_complete(queue)
    check_watch_unchanged(watch, before)


MARKERS = "SINKWATCH_REVIEW_MARKERS"  # folder where run_or_die marks the good jobs running


def run_or_die(job: Job) -> Outcome:
    """The worker's job function, except that a source named *poison* kills its worker process
    outright, as a codec segfault or the OOM killer would (module level: the spawned workers
    import it from here). The poison strikes only once a good job is running in another worker
    (or after 5 s), so that the crash always catches a good image in flight, as it would in a burst."""
    markers = Path(os.environ[MARKERS])
    if "poison" in Path(job.key).name:
        deadline = time.monotonic() + 5.0
        while not any(markers.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)
    marker = markers / f"{os.getpid()}-running"
    marker.touch()
    try:
        return process_job(job)
    finally:
        marker.unlink()


class PoisonablePool(WorkerPool):
    """The daemon's real process pool, running `run_or_die` instead of `process_job`."""

    def submit(self, job: Job) -> Future[Outcome]:
        return self._executor.submit(run_or_die, job)


def test_a_good_image_in_flight_when_another_one_kills_its_worker_is_published_not_rejected(
    folders: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    watch, queue = folders
    monkeypatch.setattr("service.daemon.WorkerPool", PoisonablePool)
    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.setenv(MARKERS, str(markers))
    # The good image takes a second or more: the poison's worker dies while it runs.
    rules = slow_rules(tmp_path / "rules", "good_*", side=3072)
    # Two images at start make the pool start both its workers, as a daemon that has been running would have.
    write_photo(watch / "warm_0.png", small_photo(2))
    write_photo(watch / "warm_1.png", small_photo(3))
    settings = Settings(
        watch=watch,
        queue=queue,
        rules=rules,
        workers=2,
        max_attempts=1,  # one crash is enough to reject the image it happened on
        metrics_port=0,
        settle_seconds=0.3,
        rescan_interval=3600,
    )
    with InProcessDaemon(settings) as running:
        wait_for(lambda: (queue / "warm_0.png").is_file() and (queue / "warm_1.png").is_file(), timeout=60)
        write_photo(watch / "good_slow.png", small_photo(0))
        wait_for(lambda: any(markers.iterdir()), timeout=30)  # the good image is in a worker now
        write_photo(watch / "poison.png", small_photo(1))
        before = snapshot(watch)
        ledger = running.daemon.ledger

        def settled() -> bool:
            entries = [ledger.get(key) for key in ("good_slow.png", "poison.png")]
            return all(e is not None and e.state in ("published", "rejected") for e in entries)

        wait_for(lambda: settled() or running.errors, timeout=120)
        assert not running.errors, running.errors
        poison, good = ledger.get("poison.png"), ledger.get("good_slow.png")
    assert poison is not None and (poison.state, poison.reason) == ("rejected", "crashed")
    assert good is not None
    assert good.state == "published", (
        f"a good image was rejected ({good.reason}: {good.message}) because another one killed a worker"
    )
    assert (queue / "good_slow.png").is_file()
    assert not (queue / "rejected" / "good_slow.json").exists()
    check_watch_unchanged(watch, before)


# -- a source changes while it is processed --------------------------------------------------------


def test_a_source_rewritten_while_its_old_content_is_processed_gets_its_new_content_published(
    folders: tuple[Path, Path], tmp_path: Path
) -> None:
    watch, queue = folders
    rules = slow_rules(tmp_path / "rules", "victim*", side=2048)
    # No reconciliation scan within the test: only the rewrite's own watch events can find it.
    settings = Settings(
        watch=watch, queue=queue, rules=rules, workers=1, metrics_port=0, settle_seconds=0.3, rescan_interval=3600
    )
    with InProcessDaemon(settings) as running:
        write_photo(watch / "warm.png", small_photo(5))  # a warm worker starts the next job at once
        wait_for((queue / "warm.png").is_file, timeout=60)

        (pid,) = worker_pids(running.daemon.engine)
        read_before = bytes_read(pid)
        old = write_photo(watch / "victim.png", small_photo(1, height=200, width=300)).read_bytes()
        # The worker has read the whole source: from here on it is in the (slow) pipeline.
        wait_for(lambda: bytes_read(pid) - read_before >= len(old), interval=0.01)
        ledger = running.daemon.ledger
        # The generator writes the file again (new content, same name) while the old one is in the pipeline.
        new = write_photo(watch / "victim.png", load_photo("coffee")[:120, :180]).read_bytes()
        assert len(new) != len(old)
        new_sha = hashlib.sha256(new).hexdigest()

        # Only the rewrite's own watch events can bring the new content out (no rescan within the test);
        # the old content may go out first. How long inotify takes to report under load is not ours to
        # judge, so the test waits for the new frame rather than for a moment that looks quiet.
        wait_for(lambda: sidecar_sha(queue, "victim") == new_sha, timeout=60)
        # The worker writes the sidecar before the daemon records the outcome in the ledger.
        wait_for(lambda: (e := ledger.get("victim.png")) is not None and (e.state, e.sha256) == ("published", new_sha))
    check_outputs_complete(queue)


# -- a retried source vanishes ---------------------------------------------------------------------


def test_run_once_ends_when_a_file_waiting_for_its_retry_is_deleted(folders: tuple[Path, Path], tmp_path: Path) -> None:
    watch, queue = folders
    good = png_bytes(load_photo("coffee")[:200, :300])
    (watch / "truncated.png").write_bytes(good[: len(good) // 2])
    once = DaemonProcess(watch, queue, tmp_path / "once.log", "--once", "--retry-base", "2")
    once.start(wait_ready=False)
    assert once.proc is not None
    try:
        wait_for(lambda: any(m.startswith("retrying truncated.png ") for m in once.messages()), timeout=60)
        # The user (or the generator's clean-up) deletes the incomplete file before its retry is due.
        (watch / "truncated.png").unlink()
        try:
            code = once.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("`run --once` never ends: the deleted file's ledger row waits for a retry forever")
        assert code == 0, once.log.read_text()[-3000:]
    finally:
        if once.proc.poll() is None:
            once.kill()


# -- the source folder is never written to ---------------------------------------------------------


def test_a_state_folder_inside_the_watch_folder_never_writes_into_the_watch_folder(
    folders: tuple[Path, Path], tmp_path: Path
) -> None:
    watch, queue = folders
    write_photo(watch / "image.png", small_photo(2))
    before = snapshot(watch)
    entries_before = sorted(p.name for p in watch.iterdir())
    done = run_sinkwatch(
        "run", "--once", "--watch", str(watch), "--queue", str(queue),
        "--state-dir", str(watch / ".sinkwatch-state"), "--metrics-port", "0",
        cwd=tmp_path,
    )  # fmt: skip
    assert sorted(p.name for p in watch.iterdir()) == entries_before, (
        f"the daemon created {sorted({p.name for p in watch.iterdir()} - set(entries_before))} in the watch "
        f"folder (exit {done.returncode})"
    )
    check_watch_unchanged(watch, before)
