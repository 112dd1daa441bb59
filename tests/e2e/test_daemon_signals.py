"""The daemon's life cycle from outside: SIGTERM drains and exits 0, SIGHUP and edits of the rules
folder reload the rules (a broken file keeps the last good ones), and the systemd notify protocol
(READY, WATCHDOG, STOPPING) over a real datagram socket."""

from __future__ import annotations

import collections
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import load_photo, wait_for
from tests.e2e.conftest import (
    SENTINEL,
    DaemonProcess,
    check_outputs_complete,
    check_watch_unchanged,
    copy_rules,
    frames,
    logged,
    metric_sum,
    metric_values,
    sentinel,
    sidecars,
    small_photo,
    snapshot,
    wait_published,
    write_photo,
)


def frame_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def build_fingerprint(daemon: DaemonProcess) -> str:
    for (name, labels), _value in metric_values(daemon.get("/metrics")[1]).items():
        if name == "sinkwatch_build_info":
            return dict(labels)["rules_fingerprint"]
    raise AssertionError("sinkwatch_build_info not exported")


# -- SIGTERM ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_during_work_finishes_what_is_in_flight_and_exits_0_with_nothing_half_written(
    daemon: DaemonProcess, folders: tuple[Path, Path], tmp_path: Path
) -> None:
    watch, queue = folders
    rules = copy_rules(tmp_path / "rules", width=256, height=144)  # quick frames: a long backlog, cheaply
    names = [f"work_{i:02}.png" for i in range(40)]
    for index, name in enumerate(names):
        write_photo(watch / name, small_photo(index, height=160, width=240))
    before = snapshot(watch)
    daemon.args += ["--rules", str(rules)]
    daemon.start()
    wait_published(queue, 2, timeout=120)
    daemon.signal(signal.SIGTERM)
    assert daemon.proc is not None
    assert daemon.proc.wait(timeout=60) == 0, daemon.log.read_text()[-4000:]

    at_stop = frames(queue)
    assert len(at_stop) < len(names), "all work was done before SIGTERM: nothing was tested"
    messages = daemon.messages()
    assert messages[-1] == "stopped", messages[-5:]
    (stopping,) = [m for m in messages if m.startswith("stopping: finishing ")]
    assert int(stopping.split()[2]) > 0, f"nothing was in flight at SIGTERM: {stopping}"
    check_outputs_complete(queue)
    assert list((queue / ".sinkwatch" / "tmp").glob("*")) == [], "temp files left after a graceful stop"
    # Everything in flight was finished and recorded: a restart neither redoes nor loses any of it.
    first_run = logged(daemon.records(), "published")
    assert sorted(first_run) == [frame.name for frame in at_stop]

    again = DaemonProcess(watch, queue, tmp_path / "again.log", "--rules", str(rules)).start()
    try:
        wait_published(queue, len(names), timeout=180)
        sentinel(watch, queue, daemon=again)
    finally:
        assert again.stop() == 0, again.log.read_text()[-4000:]
    second_run = logged(again.records(), "published")
    assert sorted(first_run + second_run) == sorted([*names, SENTINEL])
    assert not any(m.startswith("recovered") for m in again.messages()), "a graceful stop left work unrecorded"
    check_outputs_complete(queue)
    check_watch_unchanged(watch, before, added=(SENTINEL,))


# -- rules reload -----------------------------------------------------------------------------


def edit_rule(path: Path, old: str, new: str, *, keep_stat: bool = False) -> None:
    """Replace `old` by `new` in a rule file; with `keep_stat`, so that size and mtime stay the same
    (a change only a SIGHUP can reveal)."""
    st = path.stat()
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    if keep_stat:
        assert len(old) == len(new)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def reloads(daemon: DaemonProcess) -> int:
    return sum(1 for m in daemon.messages() if m.startswith("rules reloaded"))


def test_sighup_and_rule_edits_reload_the_rules_and_a_broken_file_keeps_the_last_good_ones(
    daemon: DaemonProcess, folders: tuple[Path, Path], tmp_path: Path
) -> None:
    watch, queue = folders
    rules = copy_rules(tmp_path / "rules")
    default = rules / "default.toml"
    daemon.args += ["--rules", str(rules)]
    daemon.start()
    photo = load_photo("astronaut")[:256, :384]  # landscape 3:2

    def publish(name: str, index: int) -> tuple[int, int]:
        write_photo(watch / name, photo[index:, index:])
        wait_for((queue / name).is_file)
        return frame_size(queue / name)

    assert publish("a.png", 0) == (832, 480)
    first_fingerprint = build_fingerprint(daemon)

    # Same size, same mtime: the periodic check cannot see it; SIGHUP must re-read the folder.
    edit_rule(default, "width = 832", "width = 640", keep_stat=True)
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: reloads(daemon) == 1)
    assert publish("b.png", 1) == (640, 480)
    assert build_fingerprint(daemon) != first_fingerprint

    # A plain edit is picked up without a signal.
    edit_rule(default, "width = 640", "width = 512")
    wait_for(lambda: reloads(daemon) == 2)
    assert publish("c.png", 2) == (512, 480)
    good_fingerprint = build_fingerprint(daemon)

    # A broken file: logged with its file and field, counted, and the last good rules stay.
    edit_rule(default, "width = 512", 'width = "wide"')

    def failures() -> list[dict[str, object]]:
        return [r for r in daemon.records() if str(r["message"]).startswith("rules not reloaded")]

    wait_for(failures)
    (record,) = failures()
    assert record["level"]["name"] == "ERROR"  # type: ignore[index]
    extra = record["extra"]
    assert isinstance(extra, dict)
    assert Path(str(extra["file"])) == default and extra["field"] == "resize.width", extra
    assert "default.toml" in str(record["message"]) and "resize.width" in str(record["message"])
    assert metric_sum(daemon.get("/metrics")[1], "sinkwatch_rule_reload_failures_total") == 1
    assert publish("d.png", 3) == (512, 480)
    assert build_fingerprint(daemon) == good_fingerprint

    daemon.signal(signal.SIGHUP)  # still broken: one more failure, rules unchanged
    wait_for(lambda: metric_sum(daemon.get("/metrics")[1], "sinkwatch_rule_reload_failures_total") == 2)
    assert publish("e.png", 4) == (512, 480)

    edit_rule(default, 'width = "wide"', "width = 960")
    wait_for(lambda: reloads(daemon) == 3)
    assert publish("f.png", 5) == (960, 480)

    sentinel(watch, queue, daemon=daemon)
    published = collections.Counter(logged(daemon.records(), "published"))
    assert published == collections.Counter(["a.png", "b.png", "c.png", "d.png", "e.png", "f.png", SENTINEL])
    fingerprints = {stem: card["rule"]["fingerprint"] for stem, card in sidecars(queue).items()}
    # The default rule's own fingerprint: new with each good reload, unchanged by the broken file.
    assert len({fingerprints["a"], fingerprints["b"], fingerprints["c"], fingerprints["f"]}) == 4
    assert fingerprints["c"] == fingerprints["d"] == fingerprints["e"]
    assert frame_size(queue / "a.png") == (832, 480), "a rule change must not silently reprocess old images"


# -- systemd notify ---------------------------------------------------------------------------


def test_systemd_notify_ready_after_the_startup_scan_watchdog_pings_and_stopping_on_sigterm(
    folders: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    watch, queue = folders
    backlog = 3
    for index in range(backlog):
        write_photo(watch / f"backlog_{index}.png", small_photo(index))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)  # unset: the daemon itself must ping
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        daemon = DaemonProcess(
            watch, queue, tmp_path / "daemon.log", env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000"}
        )
        received: list[str] = []

        def receive_until(done: Callable[[], bool], timeout: float = 60) -> None:
            sock.settimeout(timeout)
            while not done():
                try:
                    received.extend(sock.recv(4096).decode().splitlines())
                except TimeoutError:
                    pytest.fail(f"notify: nothing more within {timeout:.0f}s; got {received}")

        daemon.start(wait_ready=False)
        try:
            receive_until(lambda: "READY=1" in received)
            # READY=1 comes after the startup scan is queued: every backlog file is already counted.
            status, text = daemon.get("/metrics")
            assert status == 200
            assert metric_sum(text, "sinkwatch_images_discovered_total", source="startup") == backlog
            assert daemon.get("/readyz")[0] == 200

            ready_at = received.index("READY=1")
            receive_until(lambda: received[ready_at:].count("WATCHDOG=1") >= 3, timeout=10)
            wait_published(queue, backlog)

            daemon.signal(signal.SIGTERM)
            receive_until(lambda: "STOPPING=1" in received)
            assert daemon.proc is not None and daemon.proc.wait(timeout=60) == 0
        finally:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.kill()
    assert received[0] == "READY=1", received
    assert f"STATUS=watching {watch}" in received, received
    assert "WATCHDOG=1" not in received[received.index("STOPPING=1") :], received
