"""`sinkwatch run` end to end: the real daemon in a subprocess (or in-process where events must be
suppressed) on real temp folders with the real inotify observer and real photos.

Finding work (slow writers, atomic moves, bursts, the backlog, lost events), never twice and never
lost (kill -9, restart), failures (bad files, a read-only queue), odd names, a second instance.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import os
import signal
import struct
import subprocess
import unicodedata
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin
from watchdog.events import FileSystemEvent

from service.ledger import Ledger
from service.settings import Settings
from service.watcher import EnqueueHandler
from tests.conftest import load_photo, photo_file, wait_for
from tests.e2e.conftest import (
    SENTINEL,
    DaemonProcess,
    InProcessDaemon,
    check_outputs_complete,
    check_watch_unchanged,
    copy_rules,
    frames,
    logged,
    metric_sum,
    png_bytes,
    reference_frames,
    run_sinkwatch,
    sentinel,
    sidecars,
    small_photo,
    snapshot,
    wait_published,
    write_photo,
)

# Where the frame size does not matter: a small default frame keeps bursts quick on 2 cores.
TINY = {"width": 256, "height": 144}


def chunks(data: bytes, parts: int) -> list[bytes]:
    """`data` cut into `parts` pieces; for these images every cut falls inside the compressed image data."""
    step = len(data) // parts
    return [data[i * step : (i + 1) * step if i < parts - 1 else len(data)] for i in range(parts)]


def retries_of(daemon: DaemonProcess, key: str) -> int:
    return sum(1 for r in daemon.records() if str(r["message"]).startswith(f"retrying {key} "))


def tries_of(daemon: DaemonProcess, key: str) -> int:
    """How often the daemon has given up on `key` for now: retries scheduled and rejections."""
    return sum(1 for r in daemon.records() if str(r["message"]).startswith((f"retrying {key} ", f"rejected {key} ")))


# -- finding work -----------------------------------------------------------------------------


def write_slowly(daemon: DaemonProcess, path: Path, data: bytes, parts: int, *, reopen: bool) -> None:
    """Write `data` in `parts` pieces, through one open handle or (`reopen`) one open/append/close
    cycle per piece. Each pause lasts until the daemon has tried the partial file once more: a
    close-after-write, or size and mtime holding for the settle time, hand a partial file on by
    design, and the daemon must then see it is incomplete and wait for more."""
    pieces = chunks(data, parts)
    handle = None if reopen else path.open("wb")
    try:
        for done, piece in enumerate(pieces, start=1):
            if handle is None:
                with path.open("ab") as cycle:
                    cycle.write(piece)
            else:
                handle.write(piece)
                handle.flush()
            if done < parts:

                def tried(n: int = done) -> bool:
                    return tries_of(daemon, path.name) >= n

                wait_for(tried, timeout=30)
    finally:
        if handle is not None:
            handle.close()


def test_slowly_written_and_moved_in_images_are_each_processed_once_when_complete(
    daemon: DaemonProcess, folders: tuple[Path, Path], tmp_path: Path
) -> None:
    watch, queue = folders
    # A retry timer far off: the final close must be what gets each slow file processed.
    daemon.args += ["--retry-base", "30"]
    daemon.start()
    photo = load_photo("astronaut")

    # One handle: created/modified events only; every pause outlasts the settle time.
    write_slowly(daemon, watch / "one_handle.png", png_bytes(photo[:192, :288]), 4, reopen=False)
    write_slowly(daemon, watch / "slow_jpeg.jpg", photo_file("rocket").read_bytes(), 3, reopen=False)
    # Open/append/close cycles: every close is an inotify close-after-write of a partial file.
    write_slowly(daemon, watch / "cycles.png", png_bytes(photo[100:292, 50:338]), 4, reopen=True)
    # Finished elsewhere, then moved in atomically (what careful writers and rsync do).
    outside = tmp_path / "outside"
    outside.mkdir()
    write_photo(outside / "moved_in.png", photo[200:392, 150:438])
    os.replace(outside / "moved_in.png", watch / "moved_in.png")

    names = ["one_handle.png", "slow_jpeg.jpg", "cycles.png", "moved_in.png"]
    wait_published(queue, 4)
    before = snapshot(watch)
    sentinel(watch, queue, daemon=daemon)

    records = daemon.records()
    assert collections.Counter(logged(records, "published")) == collections.Counter([*names, SENTINEL])
    assert logged(records, "rejected") == []
    reference = reference_frames([watch / name for name in names], tmp_path)
    outputs = {card["source"]["key"]: stem for stem, card in sidecars(queue).items()}
    for name in names:
        frame = queue / f"{outputs[name]}.png"
        assert frame.read_bytes() == reference[frame.name], f"{name}: the frame is not that of the final file"
    check_outputs_complete(queue)
    check_watch_unchanged(watch, before, added=(SENTINEL,))


def test_a_file_appended_in_more_cycles_than_max_attempts_is_not_rejected_while_it_grows(
    daemon: DaemonProcess, folders: tuple[Path, Path], tmp_path: Path
) -> None:
    watch, queue = folders
    # Each close of a partial file is one failed attempt; growing content is progress, not a failure.
    daemon.args += ["--retry-base", "30", "--max-attempts", "3"]
    daemon.start()
    data = png_bytes(load_photo("coffee")[:240, :360])
    write_slowly(daemon, watch / "appended.png", data, 6, reopen=True)
    wait_published(queue, 1)
    sentinel(watch, queue, daemon=daemon)

    records = daemon.records()
    assert logged(records, "published") == ["appended.png", SENTINEL]
    assert logged(records, "rejected") == [], "a file still being written was rejected"
    assert metric_sum(daemon.get("/metrics")[1], "sinkwatch_rejections_total") == 0
    assert (queue / "appended.png").read_bytes() == reference_frames([watch / "appended.png"], tmp_path)["appended.png"]


@pytest.mark.slow
def test_a_burst_of_200_files_is_processed_exactly_once_each(
    daemon: DaemonProcess, folders: tuple[Path, Path], tmp_path: Path
) -> None:
    watch, queue = folders
    # A work queue far smaller than the burst: backpressure, events beyond it left to the rescan.
    daemon.args += ["--rules", str(copy_rules(tmp_path / "rules", **TINY)), "--queue-size", "32"]
    daemon.start()
    names = [f"burst_{i:03}.png" for i in range(200)]
    for index, name in enumerate(names):
        write_photo(watch / name, small_photo(index))
    before = snapshot(watch)
    wait_published(queue, 200, timeout=240)
    sentinel(watch, queue, daemon=daemon)

    expected = sorted([*names, SENTINEL])
    assert [frame.name for frame in frames(queue)] == expected
    cards = sidecars(queue)
    assert sorted(f"{stem}.png" for stem in cards) == expected
    for stem, card in cards.items():
        assert card["source"]["key"] == f"{stem}.png"
        assert (queue / "matrix" / f"{stem}.matrix.png").is_file()
    published = collections.Counter(logged(daemon.records(), "published"))
    assert sorted(published) == expected
    assert set(published.values()) == {1}, [key for key, n in published.items() if n > 1]
    text = daemon.get("/metrics")[1]
    assert metric_sum(text, "sinkwatch_images_discovered_total") == 201, "an image was discovered twice"
    assert metric_sum(text, "sinkwatch_images_discovered_total", source="scan") > 0, "no backpressure: untested"
    assert metric_sum(text, "sinkwatch_images_processed_total", outcome="published") == 201
    check_outputs_complete(queue)
    check_watch_unchanged(watch, before, added=(SENTINEL,))


def test_the_backlog_is_processed_at_start_and_a_second_instance_refuses(
    daemon: DaemonProcess, folders: tuple[Path, Path], tmp_path: Path
) -> None:
    watch, queue = folders
    names = [f"backlog_{i}.png" for i in range(5)]
    for index, name in enumerate(names):
        write_photo(watch / name, small_photo(index))
    # Never work: hidden, partial downloads, OS litter, not an image name.
    for litter in (".hidden.png", "render.png.part", "x.tmp", "Thumbs.db", "notes.txt"):
        write_photo(watch / litter, small_photo(9))
    before = snapshot(watch)
    daemon.start()
    wait_published(queue, 5)

    second = DaemonProcess(watch, queue, tmp_path / "second.log")
    second.start(wait_ready=False)
    assert second.proc is not None and daemon.proc is not None
    assert second.proc.wait(timeout=60) == 75, "refused, and started again by a supervisor once the first one ends"
    message = second.log.read_text()
    assert "another sinkwatch" in message and f"pid {daemon.proc.pid}" in message, message
    assert daemon.get("/readyz")[0] == 200, "the first daemon carries on"

    sentinel(watch, queue, daemon=daemon)
    assert [frame.name for frame in frames(queue)] == sorted([*names, SENTINEL])
    assert sorted(logged(daemon.records(), "published")) == sorted([*names, SENTINEL])
    assert metric_sum(daemon.get("/metrics")[1], "sinkwatch_images_discovered_total", source="startup") == 5
    check_outputs_complete(queue)
    check_watch_unchanged(watch, before, added=(SENTINEL,))


def test_a_file_whose_events_are_lost_is_found_by_the_reconciliation_scan(
    folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    watch, queue = folders
    dropped: list[FileSystemEvent] = []
    # inotify sees the file, but every event is lost before it reaches the daemon (as on an overflow).
    monkeypatch.setattr(EnqueueHandler, "dispatch", lambda _self, event: dropped.append(event))
    settings = Settings(
        watch=watch, queue=queue, rescan_interval=2, metrics_port=0, workers=1, settle_seconds=0.3, log_level="DEBUG"
    )
    with InProcessDaemon(settings) as running:
        write_photo(watch / "unseen.png", small_photo(3))
        before = snapshot(watch)
        wait_published(queue, 1, timeout=30)
        wait_for(lambda: running.sample("sinkwatch_images_processed_total", rule="default", outcome="published"))
        assert any(str(event.src_path).endswith("unseen.png") for event in dropped), "inotify did see the file"
        assert running.sample("sinkwatch_images_discovered_total", source="scan") == 1
        assert running.sample("sinkwatch_images_discovered_total", source="event") == 0
    assert [frame.name for frame in frames(queue)] == ["unseen.png"]
    check_outputs_complete(queue)
    check_watch_unchanged(watch, before)


def test_a_named_watch_folder_missing_at_start_is_waited_for_not_created(
    daemon: DaemonProcess, folders: tuple[Path, Path]
) -> None:
    # A mount not up yet at boot: exiting would leave the systemd unit dead, creating it would hide a typo.
    watch, queue = folders
    watch.rmdir()
    daemon.start()
    status, body = daemon.get("/healthz")
    health = json.loads(body)
    assert status == 503 and health["watch_folder_missing"] is True, body
    assert health["reason"] == "failed: watch_folder_missing, watcher", body
    assert not watch.exists(), "the daemon created the watch folder it was told to watch"
    assert any("does not exist; waiting for it" in m for m in daemon.messages())

    watch.mkdir()
    sentinel(watch, queue, daemon=daemon)
    wait_for(lambda: daemon.get("/healthz")[0] == 200, timeout=15)
    # Its first watch: no observer had stopped, so none was restarted.
    assert metric_sum(daemon.get("/metrics")[1], "sinkwatch_watcher_restarts_total") == 0
    assert not any("had stopped" in m for m in daemon.messages())


def test_a_watch_folder_moved_away_and_made_anew_is_watched_again(
    daemon: DaemonProcess, folders: tuple[Path, Path], tmp_path: Path
) -> None:
    watch, queue = folders
    # No reconciliation scan within the test: only the observer can find the new file.
    daemon.args += ["--rescan-interval", "3600"]
    daemon.start()
    write_photo(watch / "before.png", small_photo(0))
    wait_published(queue, 1)

    # Rotating ComfyUI's output folder: the old one moves aside, a new one takes its name.
    watch.rename(tmp_path / "watch.old")
    watch.mkdir()
    write_photo(watch / "after.png", small_photo(1))
    wait_for((queue / "after.png").is_file, timeout=10)
    assert metric_sum(daemon.get("/metrics")[1], "sinkwatch_watcher_restarts_total") == 1


# -- never twice, never lost --------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_during_a_burst_then_restart_leaves_one_frame_per_source_and_no_partial_files(
    folders: tuple[Path, Path], tmp_path: Path
) -> None:
    watch, queue = folders
    rules = copy_rules(tmp_path / "rules", **TINY)
    names = [f"crash_{i:03}.png" for i in range(120)]
    for index, name in enumerate(names):
        write_photo(watch / name, small_photo(index))
    before = snapshot(watch)

    first = DaemonProcess(watch, queue, tmp_path / "first.log", "--rules", str(rules)).start()
    wait_published(queue, 10, timeout=120)
    assert first.proc is not None
    pid = first.proc.pid
    # Both workers running (a worker still starting up is the next test's case).
    workers = wait_for(lambda: started_workers(pid, count=2), timeout=60)
    assert isinstance(workers, list)
    first.kill()
    try:
        wait_for(lambda: not any(alive(pid) for pid in workers), timeout=30)  # workers die with it: no orphan
    finally:
        end_orphans(workers)
    at_kill = {path.name: path.read_bytes() for path in frames(queue)}
    assert len(at_kill) < len(names), "the burst was over before the kill: nothing was tested"
    check_outputs_complete(queue)

    second = DaemonProcess(watch, queue, tmp_path / "second.log", "--rules", str(rules)).start()
    try:
        wait_published(queue, len(names), timeout=240)
        sentinel(watch, queue, daemon=second)
    finally:
        assert second.stop() == 0, second.log.read_text()[-4000:]

    expected = sorted([*names, SENTINEL])
    assert [frame.name for frame in frames(queue)] == expected
    assert {stem: card["source"]["key"] for stem, card in sidecars(queue).items()} == {
        Path(name).stem: name for name in expected
    }
    first_run, second_run = logged(first.records(), "published"), logged(second.records(), "published")
    assert [key for key, n in collections.Counter(first_run + second_run).items() if n > 1] == []
    # Frames complete at the kill (logged or not: the restart adopts them) are never made again.
    assert set(at_kill).isdisjoint(second_run), "a frame complete at the kill was processed again"
    assert {name: (queue / name).read_bytes() for name in at_kill} == at_kill
    check_outputs_complete(queue)
    assert list((queue / ".sinkwatch" / "tmp").glob("*")) == [], "temp files left after a clean stop"
    check_watch_unchanged(watch, before, added=(SENTINEL,))


def children(pid: int) -> list[int]:
    """Direct child processes of `pid` (Linux /proc)."""
    found: list[int] = []
    with contextlib.suppress(FileNotFoundError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):
                found += [int(child) for child in (task / "children").read_text().split()]
    return found


def alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie waiting for its reaper does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def worker_ready(pid: int) -> bool | None:
    """None if `pid` is not a pool worker; else whether its initializer has run (it ignores SIGTERM then)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    if b"spawn_main" not in cmdline:
        return None  # the resource tracker
    ignored = int(next(line for line in status.splitlines() if line.startswith("SigIgn:")).split()[1], 16)
    return bool(ignored & (1 << (signal.SIGTERM - 1)))


def loaded(pid: int, library: str) -> bool:
    """Whether `pid` has a shared object of `library` mapped (its import has begun)."""
    try:
        return f"/{library}" in Path(f"/proc/{pid}/maps").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False


def started_workers(daemon_pid: int, *, count: int) -> list[int] | None:
    """All children of the daemon once `count` workers have finished starting up."""
    kids = children(daemon_pid)
    return kids if sum(1 for pid in kids if worker_ready(pid)) >= count else None


def end_orphans(pids: list[int]) -> None:
    """SIGKILL what is left of the children this test's daemon started (a failed test must not leak them)."""
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_kill_9_while_a_worker_is_still_starting_leaves_no_orphan_process(
    folders: tuple[Path, Path], tmp_path: Path
) -> None:
    watch, queue = folders
    write_photo(watch / "first.png", small_photo(0))
    daemon = DaemonProcess(watch, queue, tmp_path / "daemon.log")  # not the fixture: it would SIGTERM a dead pid
    daemon.start(wait_ready=False)
    assert daemon.proc is not None
    pid = daemon.proc.pid

    def starting_worker() -> list[int] | None:
        kids = children(pid)
        # Past its start-up handshake with the daemon (it is importing numpy), initializer not run yet.
        return kids if any(worker_ready(kid) is False and loaded(kid, "numpy") for kid in kids) else None

    # The first job spawns the workers; kill the daemon while one of them is still importing.
    kids = wait_for(starting_worker, timeout=60, interval=0.005)
    assert isinstance(kids, list)
    daemon.kill()
    try:
        wait_for(lambda: not any(alive(kid) for kid in kids), timeout=12)  # with the fix: once its imports end
    finally:
        end_orphans(kids)


def test_a_source_overwritten_with_new_content_is_processed_again_and_a_resaved_identical_one_is_not(
    daemon: DaemonProcess, folders: tuple[Path, Path], tmp_path: Path
) -> None:
    watch, queue = folders
    daemon.start()
    write_photo(watch / "changed.png", small_photo(0, height=120, width=180))
    write_photo(watch / "resaved.png", small_photo(1, height=120, width=180))
    wait_published(queue, 2)
    wait_for(lambda: len(logged(daemon.records(), "published")) == 2)
    first = (queue / "changed.png").read_bytes()
    resaved = snapshot(queue)["resaved.png"]

    # New content under the same name (ComfyUI re-running into an existing file name).
    new_content = write_photo(watch / "changed.png", small_photo(2, height=120, width=180)).read_bytes()
    wait_for(lambda: logged(daemon.records(), "published").count("changed.png") == 2)
    # The same bytes written again (a re-save, a copy over it): new mtime, same content, nothing to redo.
    (watch / "resaved.png").write_bytes((watch / "resaved.png").read_bytes())
    wait_for(lambda: any(m == "unchanged content, skipped resaved.png" for m in daemon.messages()))
    before = snapshot(watch)
    sentinel(watch, queue, daemon=daemon)

    published = collections.Counter(logged(daemon.records(), "published"))
    assert published == collections.Counter(["changed.png", "changed.png", "resaved.png", SENTINEL])
    assert [frame.name for frame in frames(queue)] == ["changed.png", "resaved.png", SENTINEL]
    assert (queue / "changed.png").read_bytes() != first
    assert (queue / "changed.png").read_bytes() == reference_frames([watch / "changed.png"], tmp_path)["changed.png"]
    assert sidecars(queue)["changed"]["source"]["sha256"] == hashlib.sha256(new_content).hexdigest()
    assert snapshot(queue)["resaved.png"] == resaved, "the re-saved source's frame was written again"
    check_outputs_complete(queue)
    check_watch_unchanged(watch, before, added=(SENTINEL,))


def test_comfyui_counting_its_names_up_again_leaves_the_earlier_frames_in_the_queue(
    daemon: DaemonProcess, folders: tuple[Path, Path], tmp_path: Path
) -> None:
    """ComfyUI names an image after the highest counter left in its output folder: cleared, it writes
    ComfyUI_00001_.png again, another image. Cleared while the daemon runs, then while it is stopped."""
    watch, queue = folders
    names = ("ComfyUI_00001_.png", "ComfyUI_00002_.png")
    daemon.start()
    for index, name in enumerate(names):
        write_photo(watch / name, small_photo(index, height=120, width=180))
    wait_published(queue, 2)
    earlier = {frame.name: frame.read_bytes() for frame in frames(queue)}

    for name in names:
        (watch / name).unlink()  # the user clears the output folder, ComfyUI starts again from 00001
    write_photo(watch / names[0], small_photo(2, height=120, width=180))
    wait_published(queue, 3)
    assert daemon.stop() == 0

    # Stopped, the folder cleared: the daemon starts on an empty folder, and then ComfyUI writes 00001 again.
    (watch / names[0]).unlink()
    daemon.start()
    write_photo(watch / names[0], small_photo(3, height=120, width=180))
    wait_published(queue, 4)
    sentinel(watch, queue, daemon=daemon)

    made = {name: sidecar["source"]["sha256"] for name, sidecar in sidecars(queue).items()}
    assert len(made) == 5, made  # the two earlier frames, two new images, the sentinel
    assert {name: (queue / name).read_bytes() for name in earlier} == earlier, "an earlier frame was replaced"
    assert hashlib.sha256((watch / names[0]).read_bytes()).hexdigest() in made.values()
    renamed = [r for r in daemon.records() if "is the frame of another image once at this path" in str(r["message"])]
    assert len(renamed) == 2, [r["message"] for r in renamed]
    _status, text = daemon.get("/metrics")
    assert metric_sum(text, "sinkwatch_frames_renamed_total") == 1, "counted since the restart"
    check_outputs_complete(queue)


def png_with_note(pixels: np.ndarray, note: str) -> bytes:
    """A PNG of `pixels` with a text chunk: other notes of one length give other bytes of one size."""
    info = PngImagePlugin.PngInfo()
    info.add_text("note", note)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def test_with_polling_new_images_and_new_content_under_an_old_size_and_mtime_are_seen_past_a_link_loop(
    daemon: DaemonProcess, folders: tuple[Path, Path]
) -> None:
    watch, queue = folders
    (watch / "sub").mkdir()
    (watch / "latest").symlink_to(".")  # followed, it made every poll endless
    (watch / "sub" / "up").symlink_to("..")
    # Nothing but the poller can find the change in time: the reconciliation scan is minutes away.
    daemon.args += ["--polling", "--poll-interval", "0.2", "--recursive", "--rescan-interval", "600"]
    daemon.start()
    pixels = small_photo(0, height=120, width=180)
    image = watch / "sub" / "image.png"
    image.write_bytes(png_with_note(pixels, "take 1"))
    wait_for(lambda: "sub/image.png" in logged(daemon.records(), "published"), timeout=60)
    st = image.stat()

    # What cp -p or rsync -t --inplace leave: other bytes, in the same file, of the same size and mtime.
    with image.open("r+b") as handle:
        handle.write(png_with_note(pixels, "take 2"))
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    now = image.stat()
    assert (now.st_size, now.st_mtime_ns, now.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    wait_for(lambda: logged(daemon.records(), "published").count("sub/image.png") == 2, timeout=60)
    assert sidecars(queue)["sub__image"]["source"]["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    check_outputs_complete(queue)


def test_a_resaved_source_skipped_after_a_rule_change_keeps_the_rule_that_made_its_outputs_in_the_ledger(
    folders: tuple[Path, Path], tmp_path: Path
) -> None:
    watch, queue = folders
    rules = copy_rules(tmp_path / "rules", **TINY)
    settings = Settings(watch=watch, queue=queue, rules=rules, metrics_port=0, workers=1, settle_seconds=0.3)
    with InProcessDaemon(settings) as running:
        write_photo(watch / "kept.png", small_photo(0))
        wait_published(queue, 1)
        made_by = sidecars(queue)["kept"]["rule"]["fingerprint"]
        # A changed rule applies to new images only: re-saving the same bytes keeps the outputs.
        default = rules / "default.toml"
        default.write_text(default.read_text(encoding="utf-8").replace("sigma = 1.2", "sigma = 1.3", 1))
        wait_for(lambda: running.daemon.rules.get("default").fingerprint != made_by)
        (watch / "kept.png").write_bytes((watch / "kept.png").read_bytes())
        wait_for(lambda: running.sample("sinkwatch_images_processed_total", rule="default", outcome="skipped") == 1)
    with Ledger(settings.resolved_state_dir / "ledger.sqlite3") as ledger:
        entry = ledger.get("kept.png")
    assert entry is not None and entry.state == "published"
    assert (entry.rule, entry.fingerprint) == ("default", made_by)
    assert sidecars(queue)["kept"]["rule"]["fingerprint"] == made_by


# -- failures ---------------------------------------------------------------------------------


def bomb_png() -> bytes:
    """A well-formed PNG whose header claims 100000 x 100000 pixels (valid CRCs, tiny IDAT)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
        + chunk(b"IEND", b"")
    )


def test_bad_files_are_rejected_with_their_reasons_while_good_ones_beside_them_are_published(
    daemon: DaemonProcess, folders: tuple[Path, Path]
) -> None:
    watch, queue = folders
    daemon.args += ["--retry-base", "0.2", "--max-attempts", "2"]
    good = png_bytes(load_photo("coffee")[:200, :300])
    broken = bytearray(good)
    broken[len(good) // 3 : len(good) // 3 + 2000] = bytes(2000)  # image data zeroed: zlib/filter errors
    bad = {
        "corrupt.png": (bytes(broken), "corrupt"),
        "empty.png": (b"", "empty"),
        "not_an_image.png": (b"this is a text file, not a picture\n" * 40, "not_image"),
        "truncated.png": (good[: len(good) // 2], "incomplete"),
        "bomb.png": (bomb_png(), "bomb"),
    }
    (watch / "backlog_good.png").write_bytes(good)
    (watch / "backlog_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 100)
    daemon.start()
    for name, (data, _reason) in bad.items():
        (watch / name).write_bytes(data)
    (watch / "rocket.jpg").write_bytes(photo_file("rocket").read_bytes())
    before = snapshot(watch)

    rejected = queue / "rejected"
    wait_for(lambda: rejected.is_dir() and len(list(rejected.glob("*.json"))) == 6, timeout=60)
    wait_published(queue, 2)
    sentinel(watch, queue, daemon=daemon)

    assert [frame.name for frame in frames(queue)] == sorted(["backlog_good.png", "rocket.png", SENTINEL])
    records = {path.name: path for path in rejected.glob("*.json")}
    assert sorted(records) == sorted([f"{Path(name).stem}.json" for name in [*bad, "backlog_bad.png"]])
    for name, (_data, reason) in [*bad.items(), ("backlog_bad.png", (b"", "corrupt"))]:
        record = json.loads(records[f"{Path(name).stem}.json"].read_text(encoding="utf-8"))
        assert record["reason"] == reason, (name, record)
        assert record["key"] == name and record["message"], record
    text = daemon.get("/metrics")[1]
    for reason, count in collections.Counter([r for _d, r in bad.values()] + ["corrupt"]).items():
        assert metric_sum(text, "sinkwatch_rejections_total", reason=reason) == count, reason
    assert metric_sum(text, "sinkwatch_images_processed_total", outcome="rejected") == 6
    assert metric_sum(text, "sinkwatch_images_processed_total", outcome="published") == 3
    assert sorted(logged(daemon.records(), "rejected")) == sorted([*bad, "backlog_bad.png"])
    check_outputs_complete(queue)
    check_watch_unchanged(watch, before, added=(SENTINEL,))

    # The user replaces a rejected file with a good one: it is published and its reject record goes.
    (watch / "corrupt.png").write_bytes(good)
    wait_for((queue / "corrupt.png").is_file)
    wait_for(lambda: not (rejected / "corrupt.json").exists())
    sentinel(watch, queue, daemon=daemon, name="zz_sentinel_2.png")
    assert sorted(logged(daemon.records(), "published")) == sorted(
        ["backlog_good.png", "rocket.jpg", SENTINEL, "corrupt.png", "zz_sentinel_2.png"]
    )
    assert sorted(path.name for path in rejected.glob("*.json")) == sorted(
        f"{Path(name).stem}.json" for name in [*bad, "backlog_bad.png"] if name != "corrupt.png"
    )
    check_outputs_complete(queue)


def test_a_file_created_empty_then_filled_is_published_not_rejected(
    daemon: DaemonProcess, folders: tuple[Path, Path]
) -> None:
    # A placeholder first (`touch`, `: > f; cat img >> f`): empty for a moment is a file still being written.
    watch, queue = folders
    daemon.start()
    placeholder = watch / "placeholder.png"
    placeholder.write_bytes(b"")
    wait_for(lambda: any("empty file" in m for m in daemon.messages()), timeout=30)
    placeholder.write_bytes(png_bytes(load_photo("coffee")[:200, :300]))
    wait_for((queue / "placeholder.png").is_file, timeout=30)
    sentinel(watch, queue, daemon=daemon)
    assert not (queue / "rejected").exists()
    assert metric_sum(daemon.get("/metrics")[1], "sinkwatch_rejections_total") == 0
    assert logged(daemon.records(), "rejected") == []


@contextlib.contextmanager
def tmpfs(path: Path) -> Iterator[Path]:
    """A real tmpfs mounted at `path` (tests run as root); unmounted afterwards."""
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the read-only queue test (needs root / CAP_SYS_ADMIN): {done.stderr}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def remount(path: Path, mode: str) -> None:
    done = subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, f"remount {mode} refused: {done.stderr}"


def test_a_read_only_queue_recovers_once_it_is_writable_again(folders: tuple[Path, Path], tmp_path: Path) -> None:
    watch, _queue = folders
    with tmpfs(tmp_path / "mnt") as queue:
        # Read-only at start: a clear refusal, not a daemon that can never publish.
        remount(queue, "ro")
        refused = run_sinkwatch(
            "run", "--watch", str(watch), "--queue", str(queue), "--state-dir", str(tmp_path / "state"),
            "--metrics-port", "0", cwd=tmp_path,
        )  # fmt: skip
        # Exit 75, not 2: a read-only mount may pass, and the unit's Restart=on-failure starts it again.
        assert refused.returncode == 75, refused.stderr[-4000:]
        assert f"sinkwatch: {queue}: the queue folder is not writable" in refused.stderr, refused.stderr
        remount(queue, "rw")

        # The state (ledger, lock) lives elsewhere: the queue is ComfyUI's input/ on its own mount.
        daemon = DaemonProcess(
            watch, queue, tmp_path / "daemon.log", "--state-dir", str(tmp_path / "state"), "--retry-base", "0.5"
        )
        try:
            daemon.start()
            write_photo(watch / "before.png", small_photo(0))
            wait_published(queue, 1)

            remount(queue, "ro")
            (watch / "bad_while_read_only.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 100)
            write_photo(watch / "while_read_only.png", small_photo(1))
            wait_for(lambda: retries_of(daemon, "while_read_only.png") >= 2, timeout=30)
            assert [frame.name for frame in frames(queue)] == ["before.png"]
            assert not (queue / "rejected").exists()
            # Between attempts the work queue is empty: the retries are what the stall alert sees waiting.
            wait_for(lambda: metric_sum(daemon.get("/metrics")[1], "sinkwatch_retries_waiting") >= 1, timeout=10)

            remount(queue, "rw")
            wait_published(queue, 2, timeout=60)
            wait_for((queue / "rejected" / "bad_while_read_only.json").is_file, timeout=30)
            before = snapshot(watch)
            sentinel(watch, queue, daemon=daemon)
            read_only_failures = metric_sum(
                daemon.get("/metrics")[1], "sinkwatch_publish_errors_total", reason="read_only"
            )
        finally:
            code = daemon.stop()
        assert code == 0, daemon.log.read_text()[-4000:]
        records = daemon.records()
        assert sorted(logged(records, "published")) == ["before.png", "while_read_only.png", SENTINEL]
        assert logged(records, "rejected") == ["bad_while_read_only.png"]
        # Every failed write counted as read-only: the frame's retries, and at least one for the reject record.
        assert read_only_failures > retries_of(daemon, "while_read_only.png") >= 2
        record = json.loads((queue / "rejected" / "bad_while_read_only.json").read_text(encoding="utf-8"))
        assert record["reason"] == "corrupt", record
        check_outputs_complete(queue)
        assert list((queue / ".sinkwatch" / "tmp").glob("*")) == []
        check_watch_unchanged(watch, before, added=(SENTINEL,))


# -- names ------------------------------------------------------------------------------------

ODD_NAMES = (
    "my photo 1.png",
    "фото 日本 cafe\u0301.png",  # Cyrillic, CJK, a decomposed accent
    "a" * 200 + ".png",
    "ü" * 120 + ".png",  # 240 bytes of UTF-8
    "up..down.png",
    "..dots_first.png",  # hidden: ignored
    ".hidden.png",  # hidden: ignored
    "tab\tand\nnewline.png",
    "x:y.png",
    "x_y.png",  # "x:y" made safe collides with it
    "CON.png",
    "back\\slash.png",
    "not_utf8_\udcff\udcfe.png",  # bytes 0xff 0xfe: a name that is not UTF-8 at all
    "sub..dir/inner.png",
    "sub..dir/..hidden_inner.png",  # hidden: ignored
    "..hidden_dir/inside.png",  # in a hidden folder: ignored
)
HIDDEN = {"..dots_first.png", ".hidden.png", "sub..dir/..hidden_inner.png", "..hidden_dir/inside.png"}
UNSAFE = set('<>:"|?*\\/')


def test_odd_names_give_safe_distinct_outputs_and_hidden_files_are_ignored(
    daemon: DaemonProcess, folders: tuple[Path, Path], tmp_path: Path
) -> None:
    watch, queue = folders
    daemon.args += ["--recursive"]
    half = len(ODD_NAMES) // 2
    for index, name in enumerate(ODD_NAMES[:half]):  # some as backlog, the rest as events
        (watch / name).parent.mkdir(parents=True, exist_ok=True)
        write_photo(watch / name, small_photo(index))
    # The queue is ComfyUI's input/: it may already hold the user's own image of a source's name.
    queue.mkdir()
    users_own = write_photo(queue / "my photo 1.png", small_photo(40)).read_bytes()
    outside = tmp_path / "outside"
    outside.mkdir()
    (watch / "link_outside.png").symlink_to(write_photo(outside / "secret.png", small_photo(20)))  # not followed
    (watch / "link_inside.png").symlink_to(watch / ODD_NAMES[0])  # a file inside the watch folder: fine
    daemon.start()
    for index, name in enumerate(ODD_NAMES[half:], start=half):
        (watch / name).parent.mkdir(parents=True, exist_ok=True)
        write_photo(watch / name, small_photo(index))
    # A whole folder moved in (recursive watch): its files have no events of their own.
    (outside / "folder").mkdir()
    for index in range(2):
        write_photo(outside / "folder" / f"in_folder_{index}.png", small_photo(30 + index))
    os.replace(outside / "folder", watch / "moved folder")
    before = snapshot(watch)
    moved = {"moved folder/in_folder_0.png", "moved folder/in_folder_1.png"}
    visible = sorted(set(ODD_NAMES) - HIDDEN | {"link_inside.png"} | moved)
    wait_published(queue, len(visible) + 1)  # and the user's own image
    sentinel(watch, queue, daemon=daemon)

    cards = sidecars(queue)
    assert sorted(card["source"]["key"] for card in cards.values()) == sorted([*visible, SENTINEL])
    assert (queue / "my photo 1.png").read_bytes() == users_own, "the user's own image was overwritten"
    names = [frame.name for frame in frames(queue) if frame.name != "my photo 1.png"]
    assert sorted(f"{stem}.png" for stem in cards) == names
    assert len({unicodedata.normalize("NFC", n).casefold() for n in names}) == len(names), "names clash"
    for name in names:
        assert not name.startswith(".") and name.endswith(".png"), name
        assert not UNSAFE & set(name), name
        assert all(unicodedata.category(c)[0] != "C" for c in name), repr(name)
        assert len(name.encode("utf-8")) <= 124, (len(name.encode()), name)
        assert (queue / "matrix" / f"{Path(name).stem}.matrix.png").is_file()
    assert {p.name for p in tmp_path.iterdir()} == {"watch", "queue", "outside", "daemon.log"}, "wrote elsewhere"
    assert [p.name for p in outside.iterdir()] == ["secret.png"]
    assert sorted(logged(daemon.records(), "published")) == sorted([*visible, SENTINEL])
    check_outputs_complete(queue, foreign=("my photo 1.png",))
    check_watch_unchanged(watch, before, added=(SENTINEL,))
