"""Operations under faults, as a user running sinkwatch for weeks meets them.

Each test drives the real daemon (a subprocess, or in-process where a fault
must be injected: an inotify limit cannot be exhausted safely on a shared
machine) on real temp folders, and checks one promise: a bad setting is a
clear exit 2, an interrupted ``run --once`` does not claim success, a fault
the daemon waits out is logged once and keeps the systemd watchdog fed, a big
already-processed folder does not hold new images back, and deleting the
queue folder does not lose the single-instance lock or the ledger.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from loguru import logger
from watchdog.observers.inotify import InotifyEmitter
from watchdog.observers.inotify_c import InotifyFD, Mask

from service import watch_limit
from service.ledger import Ledger
from service.ledger_schema import db_key
from service.selection import Selection
from service.settings import Settings
from tests.conftest import wait_for
from tests.e2e.conftest import (
    REPO,
    DaemonProcess,
    InProcessDaemon,
    frames,
    http_get,
    logged,
    run_sinkwatch,
    sentinel,
    small_photo,
    write_photo,
)
from tests.faults.readings import health, log_records, metric, poll
from tests.faults.tmpfs import Tmpfs, fill


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    watch = tmp_path / "watch"
    watch.mkdir()
    return watch, tmp_path / "queue"


# -- settings and the command line --------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SINKWATCH_INCLUDE", "*.png"),  # the natural way to write one glob; lists must be JSON
        ("SINKWATCH_IGNORE", '["*.jpg"'),  # a JSON list cut short
    ],
)
def test_a_list_setting_from_the_environment_that_is_not_json_is_a_clear_error_and_exit_2(
    tmp_path: Path, variable: str, value: str
) -> None:
    # Exit 2 is what the shipped unit's RestartPreventExitStatus=2 keys on: any other code under
    # Restart=on-failure restarts a daemon that can never start, every 5 s, forever.
    done = run_sinkwatch("run", "--once", "--metrics-port", "0", cwd=tmp_path, env={variable: value}, timeout=120)
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    field = variable.removeprefix("SINKWATCH_").lower()
    assert field in done.stderr and "JSON" in done.stderr, done.stderr


def test_a_config_file_whose_sinkwatch_table_is_not_a_table_is_a_clear_error_and_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "sinkwatch.toml"
    config.write_text('sinkwatch = "watch"\n', encoding="utf-8")
    done = run_sinkwatch("run", "--once", "--metrics-port", "0", "--config", str(config), cwd=tmp_path, timeout=120)
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert str(config) in done.stderr, done.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_run_once_interrupted_before_the_backlog_is_done_does_not_exit_0(tmp_path: Path, signum: int) -> None:
    # `sinkwatch run --once && next-step` must not go on as if the backlog were done.
    watch, queue, log = tmp_path / "watch", tmp_path / "queue", tmp_path / "once.log"
    watch.mkdir()
    backlog = 150
    for index in range(backlog):
        write_photo(watch / f"backlog_{index:03d}.png", small_photo(index))
    args = [sys.executable, "-m", "service", "run", "--once", "--watch", str(watch), "--queue", str(queue)]
    args += ["--workers", "1", "--log-format", "json"]
    with log.open("wb") as handle:
        proc = subprocess.Popen(args, stdout=handle, stderr=handle, cwd=tmp_path, env=_env())
    try:
        wait_for(lambda: logged(log_records(log), "published") or proc.poll() is not None, timeout=120)
        proc.send_signal(signum)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    published = len(frames(queue))
    assert published < backlog, "the backlog was done before the signal arrived: nothing was interrupted"
    assert code != 0, f"run --once stopped by signal {signum} with {published}/{backlog} published, yet exited 0"


# -- the folder watcher cannot be restarted -----------------------------------------------------


def test_a_watcher_that_cannot_be_restarted_is_logged_once_not_on_every_loop_turn(
    folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # inotify's watch limit (fs.inotify.max_user_watches) reached: watchdog raises ENOSPC on the
    # root watch. Simulated, since exhausting the real limit would hit every process of the machine.
    watch, queue = folders
    errors: list[str] = []
    sink = logger.add(lambda message: errors.append(message.record["message"]), level="ERROR")
    settings = Settings(watch=watch, queue=queue, metrics_port=0, workers=1, settle_seconds=0.3)

    def failures() -> int:
        return sum("cannot restart the watcher" in m for m in errors)

    try:
        with InProcessDaemon(settings) as running:

            def no_watches_left(self: InotifyEmitter) -> None:
                raise OSError(errno.ENOSPC, "inotify watch limit reached")

            monkeypatch.setattr(InotifyEmitter, "on_thread_start", no_watches_left)
            running.daemon.watcher.stop()  # the observer died; every restart now fails
            wait_for(lambda: failures() >= 1, timeout=30)
            flooded = poll(lambda: failures() >= 5, timeout=3)
            monkeypatch.undo()
            # Once watches are available again the daemon watches again.
            wait_for(running.daemon.watcher.alive, timeout=120)
            write_photo(watch / "after.png", small_photo(3))
            wait_for((queue / "after.png").is_file, timeout=60)
    finally:
        logger.remove(sink)
    assert not flooded, "5 identical error lines within 3 s: one per loop turn (20 a second) for the whole outage"


def inotify_watches() -> int:
    """The inotify watches this process holds (one line per watch in /proc/self/fdinfo)."""
    count = 0
    for fd in os.listdir("/proc/self/fdinfo"):
        try:
            text = Path("/proc/self/fdinfo", fd).read_text()
        except OSError:
            continue  # closed meanwhile
        count += sum(line.startswith("inotify wd:") for line in text.splitlines())
    return count


def test_a_full_inotify_watch_table_in_recursive_mode_is_said_once_and_every_subfolder_is_watched_again_later(
    folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # fs.inotify.max_user_watches reached: watchdog skips every subfolder it cannot watch without a
    # word, and never watches it later. Simulated: ENOSPC for subfolder watches and for the daemon's
    # probe (exhausting the real table would hit every process of the machine).
    watch, queue = folders
    warnings: list[str] = []
    sink = logger.add(lambda message: warnings.append(message.record["message"]), level="WARNING")
    create_watch = InotifyFD._get_or_create_watch
    full = True

    def table(self: InotifyFD, path: bytes, mask: Mask) -> object:
        if full and path != os.fsencode(watch):
            raise OSError(errno.ENOSPC, "inotify watch limit reached")
        return create_watch(self, path, mask)

    monkeypatch.setattr(InotifyFD, "_get_or_create_watch", table)
    monkeypatch.setattr(watch_limit, "inotify_full", lambda folder: full)
    settings = Settings(
        watch=watch, queue=queue, metrics_port=0, workers=1, settle_seconds=0.3, recursive=True, rescan_interval=1.0
    )
    try:
        with InProcessDaemon(settings) as running:
            for index in range(3):
                (watch / f"sub{index}").mkdir()
                write_photo(watch / f"sub{index}" / "a.png", small_photo(index))
            # Unwatched, yet published: the reconciliation scan finds them.
            wait_for(lambda: len(frames(queue)) == 3, timeout=60)
            said = [m for m in warnings if "inotify watch limit is reached" in m]
            assert len(said) == 1, warnings
            assert inotify_watches() == 1, "only the watch folder itself is watched while the table is full"
            assert running.daemon.health()[1]["watch_limit_reached"] is True

            full = False  # the user raised the limit
            wait_for(lambda: inotify_watches() == 4, timeout=30)
            assert running.daemon.health()[1]["watch_limit_reached"] is False
            write_photo(watch / "sub1" / "b.png", small_photo(5))
            wait_for(lambda: len(frames(queue)) == 4, timeout=60)
    finally:
        logger.remove(sink)
    assert sum("inotify watch limit is reached" in m for m in warnings) == 1, "said once, not at every scan"


def test_the_watch_table_probe_finds_room_on_this_machine(tmp_path: Path) -> None:
    assert watch_limit.inotify_full(tmp_path) is False
    assert watch_limit.inotify_full(tmp_path / "missing") is False, "a vanished folder is no full table"


# -- the systemd watchdog -----------------------------------------------------------------------


class Notifications:
    """A systemd notify socket: what the daemon sent, in order."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.received: list[str] = []

    def receive_until(self, done: Callable[[], bool], *, timeout: float) -> bool:
        """Collect datagrams until `done()`; False when `timeout` passes without one arriving."""
        self.sock.settimeout(timeout)
        while not done():
            try:
                self.received.extend(self.sock.recv(4096).decode().splitlines())
            except TimeoutError:
                return False
        return True

    def drain(self) -> None:
        """Take what is already waiting, so that what follows counts only new datagrams."""
        self.sock.setblocking(False)
        try:
            while True:
                self.received.extend(self.sock.recv(4096).decode().splitlines())
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)

    def pings(self) -> int:
        return self.received.count("WATCHDOG=1")


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Notifications]]:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)  # unset: the daemon itself must ping
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        yield address, Notifications(sock)


WATCHDOG_USEC = "2000000"  # 2 s: the daemon pings every second


def test_watchdog_pings_go_on_while_the_daemon_waits_for_a_missing_watch_folder(
    tmp_path: Path, daemons: list[DaemonProcess], notify_socket: tuple[str, Notifications]
) -> None:
    # Without pings systemd kills the daemon after WatchdogSec (SIGABRT) and restarts it. The
    # restarted daemon finds no watch folder and tries to create it, which ProtectSystem=strict
    # forbids (the unit's ReadWritePaths has only the queue and the state): exit 2, and
    # RestartPreventExitStatus=2 leaves sinkwatch dead for good, also once the folder is back.
    address, notes = notify_socket
    watch, queue = tmp_path / "watch", tmp_path / "queue"
    watch.mkdir()
    daemon = DaemonProcess(
        watch, queue, tmp_path / "daemon.log", env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": WATCHDOG_USEC}
    )
    daemons.append(daemon)
    daemon.start()
    assert notes.receive_until(lambda: notes.pings() >= 2, timeout=30), notes.received

    watch.rename(tmp_path / "watch-unmounted")
    wait_for(lambda: health(daemon) == 503, timeout=30)
    wait_for(lambda: any("disappeared" in m for m in daemon.messages()), timeout=30)
    notes.drain()
    before = notes.pings()
    # Three watchdog intervals: systemd would have killed a daemon silent for one.
    kept_feeding = notes.receive_until(lambda: notes.pings() >= before + 3, timeout=6)
    assert daemon.proc is not None and daemon.proc.poll() is None
    (tmp_path / "watch-unmounted").rename(watch)
    sentinel(watch, queue, daemon=daemon)
    assert kept_feeding, f"no WATCHDOG=1 for 6 s while waiting for the watch folder: {notes.received[-5:]}"


def test_a_full_ledger_disk_is_logged_once_and_keeps_the_watchdog_fed(
    tmp_path: Path,
    tmpfs: Callable[[str, str], Tmpfs],
    daemons: list[DaemonProcess],
    notify_socket: tuple[str, Notifications],
) -> None:
    # The default state folder is QUEUE/.sinkwatch/state: a full queue disk is a full ledger disk.
    address, notes = notify_socket
    fs = tmpfs("statefs", "4m")
    watch, queue = tmp_path / "watch", tmp_path / "queue"
    watch.mkdir()
    daemon = DaemonProcess(
        watch,
        queue,
        tmp_path / "daemon.log",
        "--state-dir",
        str(fs.path / "state"),
        env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": WATCHDOG_USEC},
    )
    daemons.append(daemon)
    daemon.start()
    sentinel(watch, queue, daemon=daemon, name="before.png")
    filler = fill(fs.path)
    write_photo(watch / "during.png", small_photo(5))

    def pauses() -> int:
        return sum("cannot record progress" in str(r["message"]) for r in log_records(daemon.log))

    wait_for(lambda: pauses() >= 1, timeout=30)
    notes.drain()
    first = pauses()
    before = notes.pings()
    kept_feeding = notes.receive_until(lambda: notes.pings() >= before + 3, timeout=6)
    during = pauses() - first
    # Nothing is processed meanwhile: the health check and a metric say so, not only one log line.
    status, body = daemon.get("/healthz")
    assert (status, json.loads(body)["reason"]) == (503, "failed: ledger"), body
    assert metric(daemon, "sinkwatch_ledger_writable") == 0
    filler.unlink()

    def recovered() -> bool:
        # The frame alone proves nothing: it may have reached the queue while the ledger was full (its record
        # was the write that failed). The daemon tries again once a second; nothing may be left waiting.
        ledger_ok = health(daemon) == 200 and metric(daemon, "sinkwatch_ledger_writable") == 1
        idle = metric(daemon, "sinkwatch_queue_depth") == 0 and metric(daemon, "sinkwatch_in_flight") == 0
        return ledger_ok and idle and (queue / "during.png").is_file()

    wait_for(recovered, timeout=60)
    assert kept_feeding and during <= 1, (
        f"while the ledger's disk was full: watchdog fed: {kept_feeding}; "
        f"{during} more 'cannot record progress' lines in about 6 s (one a second for the whole outage)"
    )


# -- a big folder that was processed long ago ---------------------------------------------------


def done_backlog(watch: Path, state: Path, count: int) -> None:
    """`count` files the ledger already records as published, as after days of a generator's output."""
    rows = []
    for index in range(count):
        path = watch / f"ComfyUI_{index:05d}_.png"
        path.write_bytes(b"published long ago")
        st = path.stat()
        rows.append((db_key(path.name), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns))
    state.mkdir(parents=True)
    Ledger(state / "ledger.sqlite3").close()  # the schema, as the daemon makes it
    with sqlite3.connect(state / "ledger.sqlite3") as db:
        db.executemany(
            "INSERT INTO sources (relpath, state, size, mtime_ns, ino, ctime_ns, sha256, rule, fingerprint, attempts,"
            " updated) VALUES (?, 'published', ?, ?, ?, ?, 'done', 'default', 'done', 1, 0)",
            rows,
        )


def test_a_rescan_of_a_big_processed_folder_does_not_hold_back_a_new_image(
    folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # At one image a second a generator's folder holds 600,000 files after a week. If a
    # reconciliation scan walks all of them in one loop turn, every new image waits for the
    # whole walk, and so do the watchdog pings (WatchdogSec=60s kills the daemon once a scan
    # takes a minute). Here: a new image arrives early in a rescan of 3,000 processed files.
    watch, queue = folders
    done_backlog(watch, queue / ".sinkwatch" / "state", 3000)
    holder: list[InProcessDaemon] = []
    seen: dict[str, float] = {}
    calls = 0
    scan = Selection.scan_keys

    def watched_scan(self: Selection) -> Iterator[tuple[str, str]]:
        nonlocal calls
        calls += 1
        if calls != 2:  # the startup scan, and later rescans, unchanged
            yield from scan(self)
            return
        for index, path in enumerate(scan(self)):
            if index == 100:
                write_photo(watch / "fresh.png", small_photo(2))
                wait_for(lambda: holder[0].daemon.events.qsize() > 0, timeout=10)  # the observer has queued it
            yield path
        found = holder[0].sample("sinkwatch_images_discovered_total", source="event")
        seen["event_taken_before_the_scan_ended"] = found or 0.0

    monkeypatch.setattr(Selection, "scan_keys", watched_scan)
    settings = Settings(watch=watch, queue=queue, metrics_port=0, workers=1, settle_seconds=0.3, rescan_interval=1.0)
    with InProcessDaemon(settings) as running:
        holder.append(running)
        wait_for(lambda: "event_taken_before_the_scan_ended" in seen, timeout=120)
        wait_for((queue / "fresh.png").is_file, timeout=60)
    assert seen["event_taken_before_the_scan_ended"] >= 1, (
        "the new image was not even looked at until the rescan had walked all 2,900 remaining processed files"
    )


# -- the queue folder deleted while running ------------------------------------------------------


def test_a_deleted_and_recreated_queue_keeps_the_single_instance_lock_and_the_ledger(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    # ComfyUI's input/ cleaned out with `rm -rf input` (or a container volume re-created): the
    # default state folder QUEUE/.sinkwatch/state, ledger and lock, goes with it.
    watch, queue = tmp_path / "watch", tmp_path / "queue"
    watch.mkdir()
    first = DaemonProcess(watch, queue, tmp_path / "first.log")
    daemons.append(first)
    first.start()
    sentinel(watch, queue, daemon=first, name="before.png")

    subprocess.run(["rm", "-rf", str(queue)], check=True)
    sentinel(watch, queue, daemon=first, name="after.png")  # published into the queue made anew
    # The daemon looks for its lock and ledger once a second: a second daemon started inside that
    # second may take the lock first, and the first one then steps aside (exit 2), which is safe
    # but is not what this test is about.
    wait_for(lambda: any(m.startswith("the state folder") for m in first.messages()), timeout=30)

    second = DaemonProcess(watch, queue, tmp_path / "second.log")
    daemons.append(second)
    second.start(wait_ready=False)
    proc = second.proc
    assert proc is not None
    # It either refuses (exits) or comes up ready; whichever happens first ends the wait.
    poll(lambda: proc.poll() is not None or _ready(second), timeout=60)
    started = proc.poll() is None
    if started:
        # Two daemons now take the same events: the promise "a second sinkwatch refuses" is broken.
        second.stop()
    else:
        assert proc.returncode == 75, second.log.read_text()[-3000:]
    assert first.stop() == 0, first.log.read_text()[-3000:]
    assert not started, "a second daemon started on the same watch, queue and state folder as a running one"

    # What the first daemon recorded after the deletion must survive it: a restart publishes nothing again.
    third = DaemonProcess(watch, queue, tmp_path / "third.log")
    daemons.append(third)
    third.start()
    sentinel(watch, queue, daemon=third, name="restart.png")
    again = logged(third.records(), "published")
    assert third.stop() == 0
    assert again == ["restart.png"], f"published again after a restart: {again}"


def _ready(daemon: DaemonProcess) -> bool:
    return http_get(daemon.url + "/readyz")[0] == 200 if _listening(daemon.port) else False


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# -- things in the watch folder that are not image files -----------------------------------------


def test_fifos_sockets_device_links_and_folders_named_like_images_are_ignored_by_a_live_daemon(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    watch, queue = tmp_path / "watch", tmp_path / "queue"
    watch.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()

    def hostile(prefix: str) -> None:
        os.mkfifo(watch / f"{prefix}pipe.png")  # a reader would block forever in open()
        (watch / f"{prefix}zero.png").symlink_to("/dev/zero")  # endless bytes
        (watch / f"{prefix}outside.png").symlink_to(write_photo(outside / f"{prefix}private.png", small_photo(6)))
        (watch / f"{prefix}folder.png").mkdir()
        write_photo(watch / f"{prefix}folder.png" / "inside.png", small_photo(7))  # not recursive: not work

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(watch / "socket.png"))
        hostile("startup_")  # found by the startup scan
        daemon = DaemonProcess(watch, queue, tmp_path / "daemon.log", "--rescan-interval", "1")
        daemons.append(daemon)
        daemon.start()
        hostile("event_")  # found by watch events, and by the rescans every second
        sentinel(watch, queue, daemon=daemon)
        assert health(daemon) == 200
        assert logged(daemon.records(), "published") == ["zz_sentinel.png"]
        assert logged(daemon.records(), "rejected") == []
        assert sorted(p.name for p in frames(queue)) == ["zz_sentinel.png"]
        assert metric(daemon, "sinkwatch_images_discovered_total", source="startup") == 0
        # Three of each prefix and the socket, each counted once, however many rescans see them again.
        wait_for(lambda: metric(daemon, "sinkwatch_files_passed_over_total") == 7, timeout=10)
        time.sleep(2.5)
        assert metric(daemon, "sinkwatch_files_passed_over_total") == 7
        assert daemon.stop(timeout=60) == 0, daemon.log.read_text()[-3000:]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}
