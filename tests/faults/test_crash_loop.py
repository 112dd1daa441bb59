"""kill -9 at random points, again and again, while a generator keeps writing.

Promise under test: every source ends as exactly one frame, heatmap and
sidecar, byte-identical to a fresh run; ComfyUI never sees a temp or partial
file (checked after *every* kill, not only at the end); a killed daemon leaves
no worker publishing behind its back; the ledger agrees with the files.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from service.ledger import Ledger
from service.publish import MATRIX_DIR
from service.rules import load_rules
from tests.conftest import wait_for
from tests.e2e.conftest import DaemonProcess, frames, snapshot
from tests.faults.images import Images
from tests.faults.outputs import assert_same_outputs, check_published_set, reference_run, sha256, temp_files
from tests.faults.readings import alive, children, log_records, metric, poll, published_records
from tests.faults.service_killer import HOLD
from tests.faults.writers import Writer

pytestmark = pytest.mark.slow

SEED = 20240408
KILLER = "tests.faults.service_killer"  # `sinkwatch run` with workers that kill it, or hold a job
KILLS = 30  # issue 8 asks for at least 30
SOURCES = 80


def _sources(images: Images, rng: random.Random) -> list[tuple[str, bytes]]:
    files = []
    for i in range(SOURCES):
        fmt = "JPEG" if i % 4 == 3 else "PNG"
        data = images.make(i, fmt=fmt, side=rng.choice((96, 128, 160, 256)))
        files.append((f"gen_{i:03d}.{'jpg' if fmt == 'JPEG' else 'png'}", data))
    return files


def test_kill9_loop_leaves_one_complete_matching_output_per_source(
    tmp_path: Path, images: Images, daemons: list[DaemonProcess], counts: Callable[..., None]
) -> None:
    rng = random.Random(SEED)
    watch, queue, reference = tmp_path / "watch", tmp_path / "queue", tmp_path / "reference"
    watch.mkdir()
    files = _sources(images, rng)
    writer = Writer(watch, files, seed=SEED, pause=(0.1, 1.4))
    writer.start()

    kill_points: Counter[str] = Counter()
    visible_checks = 0
    orphans = 0
    workers_seen = 0  # `orphans == 0` says something only if some kills had workers to orphan
    checked: dict[str, tuple[int, int, int]] = {}
    try:
        for iteration in range(KILLS):
            daemon = DaemonProcess(watch, queue, tmp_path / f"daemon-{iteration:02d}.log", "--retry-base", "0.2")
            daemons.append(daemon)
            # A quarter of the kills land while the daemon starts (clean-up, recovery, backlog scan), the
            # rest while its workers publish (temp files, half-published sets, ledger rows in flight).
            point = "starting" if rng.random() < 0.25 else "working"
            if point == "starting":
                daemon.start(wait_ready=False)
                time.sleep(rng.uniform(0.05, 1.2))  # the kill point
            else:
                daemon.start()
                if not poll(functools.partial(published_records, daemon.log), timeout=3):
                    point = "idle"  # nothing to do right now: a kill of an idle daemon counts too
                time.sleep(rng.uniform(0.0, 0.5))  # the kill point
            assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log.read_text()[-3000:]
            offspring = children(daemon.proc.pid)
            workers = [pid for pid in offspring if "spawn_main" in _cmdline(pid)]
            workers_seen += len(workers)
            daemon.kill()
            kill_points[point] += 1
            # No worker may outlive its daemon and go on publishing (PR_SET_PDEATHSIG); survivors are
            # counted, then ended so that they cannot blur the checks that follow.
            orphans += len(reap(workers, grace=2.0))
            reap(offspring, grace=2.0)  # multiprocessing's resource tracker ends once the workers are gone
            check_published_set(queue, checked=checked)  # what ComfyUI would list right now: finished frames only
            visible_checks += 1
    finally:
        written = writer.finish(halt=False)
    assert len(written) == SOURCES

    final = DaemonProcess(watch, queue, tmp_path / "daemon-final.log", "--retry-base", "0.2")
    daemons.append(final)
    final.start()

    def settled() -> bool:
        return (
            len(frames(queue)) >= SOURCES
            and metric(final, "sinkwatch_queue_depth") == 0
            and metric(final, "sinkwatch_in_flight") == 0
        )

    wait_for(settled, timeout=120)
    assert final.stop() == 0, final.log.read_text()[-3000:]

    logs = sorted(tmp_path.glob("daemon-*.log"))
    publications = Counter(str(r["extra"]["source"]) for log in logs for r in published_records(log))
    recovered = sum("recovered" in str(r["message"]) for log in logs for r in log_records(log))
    counts(
        kills=sum(kill_points.values()),
        kill_points=dict(kill_points),
        sources=SOURCES,
        orphaned_workers=orphans,
        workers_at_kills=workers_seen,
        visible_checks=visible_checks,
        publications=sum(publications.values()),
        republished=sum(n - 1 for n in publications.values() if n > 1),
        recovery_runs=recovered,
    )
    assert sum(kill_points.values()) >= 30
    assert workers_seen > 0, "no kill found a worker process to orphan: the orphan check above says nothing"
    assert orphans == 0, f"{orphans} workers outlived their killed daemon"

    # Exactly one frame, heatmap and sidecar per source, nothing else visible, nothing left over.
    by_key = check_published_set(queue)
    assert sorted(by_key) == sorted(name for name, _ in files)
    assert len(frames(queue)) == SOURCES
    stems = [Path(s["output"]["frame"]).stem for s in by_key.values()]
    assert sorted(os.listdir(queue / MATRIX_DIR)) == sorted(
        [f"{n}.matrix.png" for n in stems] + [f"{n}.json" for n in stems]
    )
    assert {p.name for p in queue.iterdir() if not p.is_file()} <= {MATRIX_DIR, ".sinkwatch"}
    assert temp_files(queue) == [], "temp files left after a clean stop"

    # The ledger agrees: every source published, under its content's hash and its output name.
    content = dict(files)
    with Ledger(queue / ".sinkwatch" / "state" / "ledger.sqlite3") as ledger:
        entries = ledger.entries()
    assert sorted(e.relpath for e in entries) == sorted(content)
    for entry in entries:
        assert entry.state == "published", entry
        assert entry.sha256 == sha256(content[entry.relpath]), entry
        assert f"{entry.output_name}.png" == by_key[entry.relpath]["output"]["frame"], entry

    # The sources are untouched, and every output is what a fresh run makes of them.
    assert {name: digest for name, (digest, _mtime) in snapshot(watch).items()} == {
        name: sha256(data) for name, data in files
    }
    rules = load_rules(None)
    for entry in entries:
        source = watch.resolve() / entry.relpath
        assert entry.output_name is not None
        outcome = reference_run(
            source, key=entry.relpath, name=entry.output_name, rule=rules.select(entry.relpath), queue=reference
        )
        assert outcome.status == "published", outcome
        assert_same_outputs(queue, reference, entry.output_name)


def test_workers_die_with_a_daemon_killed_while_they_start(
    tmp_path: Path, images: Images, daemons: list[DaemonProcess], counts: Callable[..., None]
) -> None:
    """kill -9 just after the pool spawned its workers, before their initializer ran.

    Nothing may survive the daemon: an orphaned worker would take the jobs
    already queued for it and publish behind the back of the next daemon.
    """
    watch, queue = tmp_path / "watch", tmp_path / "queue"
    watch.mkdir()
    for i in range(12):
        (watch / f"backlog_{i:02d}.png").write_bytes(images.make(i, side=96))
    survivors: list[int] = []
    rounds = 2
    for attempt in range(rounds):
        daemon = DaemonProcess(watch, queue, tmp_path / f"daemon-{attempt}.log")
        daemons.append(daemon)
        daemon.start()
        assert daemon.proc is not None
        pid = daemon.proc.pid
        # The backlog makes the pool spawn its workers at once; kill as soon as they exist.

        def spawned(pid: int = pid) -> list[int]:
            return [c for c in children(pid) if "spawn_main" in _cmdline(c)]

        workers = wait_for(spawned, timeout=30)
        assert isinstance(workers, list)
        daemon.kill()
        survivors += reap(workers, grace=5.0)
    counts(rounds=rounds, orphaned_workers=len(survivors))
    assert survivors == [], f"{len(survivors)} worker processes outlived their killed daemon"


def test_an_image_that_gets_the_whole_service_killed_is_rejected_not_restarted_for_ever(
    tmp_path: Path, images: Images, daemons: list[DaemonProcess], counts: Callable[..., None]
) -> None:
    """An out-of-memory kill of the whole control group takes the daemon with the worker (systemd's
    OOMPolicy=kill, a Kubernetes container); each start here is the restart that follows. Before, each start's
    recovery gave the attempt back, and the service was killed and restarted for ever."""
    max_attempts = 2
    watch, queue = tmp_path / "watch", tmp_path / "queue"
    watch.mkdir()
    good = [f"good_{i}.png" for i in range(4)]
    for i, name in enumerate(good):
        (watch / name).write_bytes(images.make(i, side=128))
    (watch / "poison.png").write_bytes(images.make(len(good), side=128))
    before = snapshot(watch)
    rejected = queue / "rejected" / "poison.json"
    daemon = None
    while not rejected.is_file():
        assert len(daemons) <= max_attempts + 2, "the service is killed and restarted for ever"
        daemon = DaemonProcess(
            watch,
            queue,
            tmp_path / f"daemon-{len(daemons)}.log",
            "--max-attempts",
            str(max_attempts),
            main=KILLER,
        )
        daemons.append(daemon)
        daemon.start(wait_ready=False)

        def ended(started: DaemonProcess = daemon) -> bool:
            assert started.proc is not None
            return started.proc.poll() is not None or rejected.is_file()

        wait_for(ended, timeout=60)
    assert daemon is not None and daemon.proc is not None
    killed = [d for d in daemons if d.proc is not None and d.proc.returncode == -signal.SIGKILL]
    counts(starts=len(daemons), killed=len(killed))
    # The kill that caught it in a burst counts for no image; then each kill while it ran on its own counts.
    assert killed == daemons[:-1] and len(killed) == max_attempts + 1
    assert daemon.proc.poll() is None, "the start that rejected the image did not stay up"
    wait_for(lambda: all((queue / name).is_file() for name in good), timeout=60)
    assert daemon.stop() == 0, daemon.log.read_text()[-3000:]

    record = json.loads(rejected.read_text(encoding="utf-8"))
    assert (record["error"], record["reason"], record["key"]) == ("ServiceKilled", "crashed", "poison.png")
    assert record["message"] == f"sinkwatch was killed on this image (attempt {max_attempts} of {max_attempts})"
    assert not (queue / "poison.png").exists()
    with Ledger(queue / ".sinkwatch" / "state" / "ledger.sqlite3") as ledger:
        states = {entry.relpath: (entry.state, entry.reason) for entry in ledger.entries()}
    assert states == {"poison.png": ("rejected", "crashed")} | {name: ("published", None) for name in good}
    check_published_set(queue)
    assert snapshot(watch) == before


def test_kills_that_end_a_stop_never_reject_the_image_in_flight(
    tmp_path: Path, images: Images, daemons: list[DaemonProcess], counts: Callable[..., None]
) -> None:
    """systemd's TimeoutStopSec (a Kubernetes grace period) SIGKILLs a stop whose image in flight outlasts it:
    the stop's timeout, not the image's doing, however often it happens (before, the second such kill rejected
    the image with --max-attempts 1)."""
    watch, queue = tmp_path / "watch", tmp_path / "queue"
    watch.mkdir()
    (watch / "slow.png").write_bytes(images.make(0, side=128))
    hold = tmp_path / "hold"
    hold.touch()
    args = ("--max-attempts", "1")
    env = {HOLD: str(hold)}
    kills = 3
    for kill in range(kills):
        daemon = DaemonProcess(watch, queue, tmp_path / f"daemon-{kill}.log", *args, env=env, main=KILLER)
        daemons.append(daemon)
        daemon.start()
        wait_for(functools.partial(held, daemon), timeout=60)
        daemon.signal(signal.SIGTERM)
        wait_for(functools.partial(stopping, daemon), timeout=30)
        daemon.kill()  # the stop's timeout
    hold.unlink()
    final = DaemonProcess(watch, queue, tmp_path / "daemon-final.log", *args, env=env, main=KILLER)
    daemons.append(final)
    final.start()
    wait_for((queue / "slow.png").is_file, timeout=60)
    assert final.stop() == 0, final.log.read_text()[-3000:]
    counts(kills=kills)
    with Ledger(queue / ".sinkwatch" / "state" / "ledger.sqlite3") as ledger:
        entry = ledger.get("slow.png")
    assert entry is not None and entry.state == "published", entry
    assert not (queue / "rejected" / "slow.json").exists()


def held(daemon: DaemonProcess) -> bool:
    return metric(daemon, "sinkwatch_in_flight") == 1


def stopping(daemon: DaemonProcess) -> bool:
    return any(message.startswith("stopping:") for message in daemon.messages())


def reap(pids: list[int], *, grace: float) -> list[int]:
    """The processes of `pids` still alive after `grace` seconds, killed (by pid) before returning."""
    deadline = time.monotonic() + grace
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    survivors = [pid for pid in pids if alive(pid)]
    for pid in survivors:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return survivors


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
