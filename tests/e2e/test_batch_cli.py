"""The command line as a user runs it: `sinkwatch run --once`, `sinkwatch process`, refusing a
layout that would eat its own output, and a first start with no configuration at all."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.lock import QueueLock
from tests.conftest import load_photo, wait_for
from tests.e2e.conftest import (
    REPO,
    check_outputs_complete,
    check_watch_unchanged,
    frames,
    free_port,
    http_get,
    logged,
    run_sinkwatch,
    small_photo,
    snapshot,
    write_photo,
)


def records(stderr: str) -> list[dict[str, Any]]:
    """The JSON log records of a command's stderr (loguru writes JSON lines when not on a terminal)."""
    out = []
    for line in stderr.splitlines():
        try:
            out.append(json.loads(line)["record"])
        except (ValueError, KeyError):
            continue
    return out


def last_word(stderr: str) -> str:
    """The message a command ended with: its last log line, an ERROR, in JSON as the rest (not on a terminal)."""
    record = json.loads(stderr.strip().splitlines()[-1])["record"]
    assert record["level"]["name"] == "ERROR", record
    return str(record["message"])


def corrupt_png() -> bytes:
    """A PNG signature and header followed by nonsense."""
    return b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + b"nonsense" * 64


def test_run_once_exits_0_after_the_backlog_and_1_when_something_was_rejected(tmp_path: Path) -> None:
    watch, queue = tmp_path / "watch", tmp_path / "queue"
    watch.mkdir()
    names = ["one.png", "two.png", "three.png"]
    for index, name in enumerate(names):
        write_photo(watch / name, small_photo(index, height=120, width=180))
    before = snapshot(watch)

    done = run_sinkwatch("run", "--once", "--watch", str(watch), "--queue", str(queue), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert [frame.name for frame in frames(queue)] == sorted(names)
    assert sorted(logged(records(done.stderr), "published")) == sorted(names)
    published = {frame.name: frame.read_bytes() for frame in frames(queue)}
    check_watch_unchanged(watch, before)

    (watch / "broken.png").write_bytes(corrupt_png())
    before = snapshot(watch)
    done = run_sinkwatch("run", "--once", "--watch", str(watch), "--queue", str(queue), cwd=tmp_path)
    assert done.returncode == 1, done.stderr[-4000:]
    log = records(done.stderr)
    assert logged(log, "published") == [], "the backlog done by the first run was processed again"
    assert logged(log, "rejected") == ["broken.png"]
    assert json.loads((queue / "rejected" / "broken.json").read_text())["reason"] == "corrupt"
    assert {frame.name: frame.read_bytes() for frame in frames(queue)} == published
    check_outputs_complete(queue)
    check_watch_unchanged(watch, before)


def test_broken_rules_refuse_the_start_before_anything_is_made(tmp_path: Path) -> None:
    watch, queue, rules = tmp_path / "watch", tmp_path / "queue", tmp_path / "rules"
    watch.mkdir()
    rules.mkdir()
    (rules / "default.toml").write_text('name = "default"\n[resize]\nwidth = 830\n')
    done = run_sinkwatch(
        "run", "--once", "--watch", str(watch), "--queue", str(queue), "--rules", str(rules), cwd=tmp_path
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"{rules / 'default.toml'}: resize.width" in done.stderr
    assert not queue.exists(), "the queue (its locks, its watch-folder record) was made for a start that was refused"


def test_process_makes_the_daemons_frames_and_exits_1_when_a_file_is_rejected(tmp_path: Path) -> None:
    watch = tmp_path / "watch"
    watch.mkdir()
    photo = load_photo("chelsea")
    sources = [write_photo(watch / f"cat_{i}.png", photo[i * 20 :, i * 30 :]) for i in range(3)]
    (watch / "broken.png").write_bytes(corrupt_png())
    sources.append(watch / "broken.png")
    before = snapshot(watch)

    by_daemon = run_sinkwatch("run", "--once", "--watch", str(watch), "--queue", str(tmp_path / "daemon"), cwd=tmp_path)
    assert by_daemon.returncode == 1, by_daemon.stderr[-4000:]
    batch = run_sinkwatch("process", *map(str, sources), "--queue", str(tmp_path / "batch"), cwd=tmp_path)
    assert batch.returncode == 1, batch.stderr[-4000:]
    assert "3 published" in batch.stderr and "1 rejected" in batch.stderr, batch.stderr[-2000:]

    daemon_frames = {frame.name: frame.read_bytes() for frame in frames(tmp_path / "daemon")}
    batch_frames = {frame.name: frame.read_bytes() for frame in frames(tmp_path / "batch")}
    assert sorted(batch_frames) == ["cat_0.png", "cat_1.png", "cat_2.png"]
    assert batch_frames == daemon_frames, "`process` and the daemon made different frames of the same files"
    for queue in (tmp_path / "daemon", tmp_path / "batch"):
        assert json.loads((queue / "rejected" / "broken.json").read_text())["reason"] == "corrupt"
        check_outputs_complete(queue)
    check_watch_unchanged(watch, before)


@pytest.mark.parametrize("first", ["process", "run"])
def test_process_and_run_on_one_state_never_make_a_frame_twice(tmp_path: Path, first: str) -> None:
    watch, queue = tmp_path / "watch", tmp_path / "queue"
    (watch / "sub").mkdir(parents=True)
    names = ["one.png", "sub/two.png"]
    for index, name in enumerate(names):
        write_photo(watch / name, small_photo(index, height=120, width=180))
    folders = ("--watch", str(watch), "--queue", str(queue), "--recursive")
    commands = {"process": ("process", str(watch), *folders), "run": ("run", "--once", *folders)}
    second = "run" if first == "process" else "process"

    done = run_sinkwatch(*commands[first], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    made = {frame.name: frame.read_bytes() for frame in frames(queue)}
    assert sorted(made) == ["one.png", "sub__two.png"], sorted(made)
    again = run_sinkwatch(*commands[second], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]

    assert logged(records(again.stderr), "published") == [], f"`{second}` made again what `{first}` had made"
    if second == "process":
        assert "0 published, 2 unchanged, 0 rejected, 0 unfinished" in again.stderr, again.stderr[-2000:]
    assert {frame.name: frame.read_bytes() for frame in frames(queue)} == made
    check_outputs_complete(queue)


@pytest.mark.parametrize("state", ["the daemon's", "one of its own"])
def test_process_given_the_daemons_files_without_its_watch_folder_makes_no_second_frame(
    tmp_path: Path, state: str
) -> None:
    watch, queue = tmp_path / "watch", tmp_path / "queue"
    (watch / "sub").mkdir(parents=True)
    names = ["one.png", "sub/two.png"]
    for index, name in enumerate(names):
        write_photo(watch / name, small_photo(index, height=120, width=180))
    # As the systemd unit with SINKWATCH_STATE_DIR=/var/lib/sinkwatch; `process` keeps its state in the queue.
    daemons_state = ("--state-dir", str(tmp_path / "state")) if state == "one of its own" else ()
    done = run_sinkwatch(
        "run", "--once", "--watch", str(watch), "--queue", str(queue), "--recursive", *daemons_state, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-4000:]
    made = snapshot(queue / "matrix") | {frame.name: snapshot(queue)[frame.name] for frame in frames(queue)}
    assert sorted(frame.name for frame in frames(queue)) == ["one.png", "sub__two.png"]

    # A shell user away from the watch folder names the daemon's files, one by a relative path, and no --watch.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    again = run_sinkwatch(
        "process", "../watch/one.png", str(watch / "sub" / "two.png"), "--queue", str(queue), cwd=elsewhere
    )
    assert again.returncode == 0, again.stderr[-4000:]
    assert logged(records(again.stderr), "published") == [], "`process` made the daemon's frames a second time"
    assert "0 published, 2 unchanged, 0 rejected, 0 unfinished" in again.stderr, again.stderr[-2000:]
    now = snapshot(queue / "matrix") | {frame.name: snapshot(queue)[frame.name] for frame in frames(queue)}
    assert now == made
    check_outputs_complete(queue)


@pytest.mark.parametrize("first", ["run", "process"])
def test_a_lost_ledger_keeps_every_output_and_makes_only_the_changed_source_again_under_a_new_name(
    tmp_path: Path, first: str
) -> None:
    watch, queue = tmp_path / "watch", tmp_path / "queue"
    watch.mkdir()
    names = ["one.png", "two.png", "three.png"]
    for index, name in enumerate(names):
        write_photo(watch / name, small_photo(index, height=120, width=180))
    run = ("run", "--once", "--watch", str(watch), "--queue", str(queue))
    # `process` started away from the watch folder records sources by absolute path, the daemon by their
    # path in --watch: the sidecars name the one or the other.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    commands = {"process": ("process", str(watch), "--queue", str(queue)), "run": run}
    done = run_sinkwatch(*commands[first], cwd=elsewhere)
    assert done.returncode == 0, done.stderr[-4000:]
    made = snapshot(queue / "matrix") | {frame.name: snapshot(queue)[frame.name] for frame in frames(queue)}

    shutil.rmtree(queue / ".sinkwatch" / "state")  # deleted, or lost with its disk
    write_photo(watch / "three.png", small_photo(5, height=120, width=180))
    before = snapshot(watch)
    again = run_sinkwatch(*run, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    log = records(again.stderr)
    assert logged(log, "published") == ["three.png"]
    kept = sorted(str(r["extra"]["source"]) for r in log if str(r["message"]).startswith("kept "))
    assert kept == ["one.png", "two.png"]
    now = snapshot(queue / "matrix") | {frame.name: snapshot(queue)[frame.name] for frame in frames(queue)}
    assert {name for name in made if now[name] != made[name]} == set(), "outputs were rewritten"
    # Nothing tells that three.png's new bytes are an edit and not another image put there: its earlier frame
    # stays, and the new one takes a name of its own.
    added = sorted(set(now) - set(made))
    assert len(added) == 3 and all(name.startswith("three-") for name in added), added
    check_outputs_complete(queue)
    check_watch_unchanged(watch, before)

    third = run_sinkwatch(*run, cwd=tmp_path)
    assert third.returncode == 0, third.stderr[-4000:]
    assert not [r for r in records(third.stderr) if str(r["extra"].get("source", "")) in names], "the ledger forgot"


def test_process_is_refused_a_queue_another_sinkwatch_publishes_into_whatever_its_state_folder(
    tmp_path: Path,
) -> None:
    queue = tmp_path / "queue"
    queue.mkdir()
    source = write_photo(tmp_path / "mine.png", small_photo(0))
    # As a daemon with SINKWATCH_STATE_DIR=/var/lib/sinkwatch holds it; `process` keeps its state in the queue.
    with QueueLock(queue):
        done = run_sinkwatch("process", str(source), "--queue", str(queue), cwd=tmp_path)
    assert done.returncode == 75, done.stderr[-4000:]
    message = last_word(done.stderr)
    busy = f"another sinkwatch (pid {os.getpid()}) already uses the queue folder {queue}"
    assert message == f"sinkwatch: {busy} (this may pass: try again later)"
    assert frames(queue) == [], "it published into a queue another sinkwatch writes"


@pytest.mark.parametrize("command", ["run", "process"])
@pytest.mark.parametrize("where", ["the watch folder itself", "a folder inside it"])
def test_a_queue_inside_the_watch_folder_is_refused(tmp_path: Path, where: str, command: str) -> None:
    watch = tmp_path / "watch"
    watch.mkdir()
    write_photo(watch / "image.png", small_photo(0))
    queue = watch if where == "the watch folder itself" else watch / "frames" / "out"
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    rest = ["--metrics-port", "0"] if command == "run" else [str(watch / "image.png")]

    done = run_sinkwatch(command, "--watch", str(watch), "--queue", str(queue), *rest, cwd=tmp_path)

    assert done.returncode == 2, done.stderr
    message = last_word(done.stderr)
    assert message.startswith("sinkwatch: ") and str(queue) in message, message
    assert "is the watch folder or inside it" in message and "its own output" in message, message
    assert "Traceback" not in done.stderr
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before, "it created something"


def test_process_never_takes_the_queues_own_frames_for_sources(tmp_path: Path) -> None:
    """`process` over ComfyUI's input folder, which is also the queue, would clean its frames again and again."""
    comfy = tmp_path / "ComfyUI"
    queue = comfy / "input"
    queue.mkdir(parents=True)
    write_photo(comfy / "image.png", small_photo(0))
    # From inside the queue, where the embedded default watch folder (./watch, never read here) would be in it.
    first = run_sinkwatch("process", "--queue", ".", str(comfy / "image.png"), cwd=queue)
    assert first.returncode == 0, first.stderr
    assert [frame.name for frame in frames(queue)] == ["image.png"]

    def outputs() -> dict[str, tuple[str, int]]:
        return {path: found for path, found in snapshot(queue).items() if not path.startswith(".sinkwatch")}

    before = outputs()

    named = run_sinkwatch("process", "--queue", str(queue), str(queue), cwd=tmp_path)
    around = run_sinkwatch("process", "--recursive", "--queue", str(queue), str(comfy), cwd=tmp_path)

    assert named.returncode == 2, named.stderr
    assert last_word(named.stderr) == f"sinkwatch: {queue}: it is in the queue folder {queue}: " + (
        "sinkwatch would process its own output"
    )
    assert around.returncode == 0, around.stderr
    warned = [r["message"] for r in records(around.stderr) if r["level"]["name"] == "WARNING"]
    assert warned == [f"{comfy}: left out 2 files in the queue folder {queue}: its own output"], (
        around.stderr
    )  # frame, heatmap
    assert "0 published, 1 unchanged, 0 rejected" in around.stderr
    assert outputs() == before, "a frame was made from a frame"


class OnATerminal:
    """`sinkwatch process` with a pseudo-terminal for its stderr, in a process group of its own; what it
    shows there is read as it comes (a full terminal would stop it)."""

    def __init__(self, *args: str, cwd: Path) -> None:
        main, shown = pty.openpty()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service", "process", *args],
            cwd=cwd,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=shown,
            start_new_session=True,
        )
        os.close(shown)
        self.chunks: list[bytes] = []
        self.hung_up = threading.Event()
        self.reader = threading.Thread(target=self._read, args=(main,), daemon=True)
        self.reader.start()

    def _read(self, main: int) -> None:
        try:
            while not self.hung_up.is_set():
                if select.select([main], [], [], 0.05)[0]:
                    chunk = os.read(main, 65536)
                    if not chunk:
                        break
                    self.chunks.append(chunk)
        except OSError:  # EIO: the last process holding the terminal is gone
            pass
        finally:
            os.close(main)

    def hang_up(self) -> None:
        """The terminal window closed: its side of the terminal is gone, and writes to it fail (EIO)."""
        self.hung_up.set()
        self.reader.join(timeout=10)

    @property
    def shown(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    def finish(self, timeout: float = 60) -> int:
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self.process.kill()
            self.process.wait()
            self.reader.join(timeout=10)


@pytest.mark.parametrize(
    ("signum", "then", "gap"),
    [
        (signal.SIGINT, signal.SIGINT, 0.02),
        (signal.SIGTERM, signal.SIGTERM, 0.02),
        (signal.SIGHUP, signal.SIGHUP, 0.02),
        (signal.SIGTERM, signal.SIGHUP, 0.0),  # as systemd's SendSIGHUP=yes does
    ],
)
def test_process_stopped_by_a_signal_twice_stops_as_for_ctrl_c_and_a_second_run_does_the_rest(
    tmp_path: Path, signum: signal.Signals, then: signal.Signals, gap: float
) -> None:
    """Ctrl-C pressed twice, a CI job cancelled, a terminal closed: the signal goes to the whole process group
    (workers and multiprocessing's resource tracker too), and another may follow. The workers finish what they
    hold, nothing is left behind, and the progress line is ended."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(40):
        write_photo(photos / f"{index:02d}.png", small_photo(index, height=120, width=180))
    queue = tmp_path / "queue"
    run = OnATerminal("--log-format", "text", "--workers", "1", "--queue", str(queue), str(photos), cwd=tmp_path)
    wait_for(lambda: "published" in run.shown, timeout=60)
    os.killpg(run.process.pid, signum)
    time.sleep(gap)
    os.killpg(run.process.pid, then)
    code = run.finish(timeout=30)
    spools = list(Path(tempfile.gettempdir()).glob(f"sinkwatch-workers-{run.process.pid}-*"))

    rest = run_sinkwatch("process", "--queue", str(queue), str(photos), cwd=tmp_path)

    assert code in (128 + signum, 128 + then), run.shown[-3000:]  # both pending at once: the lower one comes first
    for unwanted in ("Traceback", "leaked", "resource_tracker"):
        assert unwanted not in run.shown, run.shown[-3000:]
    assert "\r[" in run.shown and run.shown.endswith("\n"), repr(run.shown[-300:])
    said = re.search(
        r"sinkwatch process: stopped by (SIG\w+): (\d+) published, 0 unchanged, 0 rejected, (\d+) left ", run.shown
    )
    assert said is not None, run.shown[-3000:]
    assert said[1] in (signum.name, then.name) and int(said[2]) + int(said[3]) == 40, said[0]
    assert spools == [], "its workers' folder was left behind"
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert len(frames(queue)) == 40


def test_process_whose_terminal_was_closed_stops_with_the_hangup(tmp_path: Path) -> None:
    """The progress line cannot be ended on a terminal that is gone: the stop goes on all the same."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(40):
        write_photo(photos / f"{index:02d}.png", small_photo(index, height=120, width=180))
    run = OnATerminal("--log-format", "text", "--workers", "1", "--queue", str(tmp_path / "queue"), str(photos),
                      cwd=tmp_path)  # fmt: skip
    wait_for(lambda: "published" in run.shown, timeout=60)
    run.hang_up()
    os.killpg(run.process.pid, signal.SIGHUP)
    assert run.finish(timeout=30) == 128 + signal.SIGHUP


def test_process_with_json_lines_on_a_terminal_draws_no_progress_among_them(tmp_path: Path) -> None:
    """`docker run -t` with SINKWATCH_LOG_FORMAT=json: a log shipper reads the lines."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(3):
        write_photo(photos / f"{index}.png", small_photo(index))
    run = OnATerminal("--log-format", "json", "--queue", str(tmp_path / "queue"), str(photos), cwd=tmp_path)
    assert run.finish() == 0, run.shown[-3000:]
    *logged_lines, summary = run.shown.splitlines()
    assert [json.loads(line)["record"]["level"]["name"] for line in logged_lines].count("INFO") >= 3
    assert summary.startswith("sinkwatch process: 3 published"), summary


def test_a_metrics_port_in_use_is_a_clear_startup_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_sinkwatch(
            "run", "--watch", str(tmp_path / "watch"), "--queue", str(tmp_path / "queue"),
            "--metrics-port", str(port), cwd=tmp_path,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr[-4000:]
    message = last_word(done.stderr)
    assert message.startswith("sinkwatch: metrics listener: ") and f"127.0.0.1:{port} is already in use" in message
    assert "--metrics-port" in message and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("flags", "env"),
    [
        ((), {"SINKWATCH_LOG_FORMAT": "json", "SINKWATCH_WORKERS": "two"}),  # the Docker image's way
        (("--log-format", "json", "--workers", "0"), {}),
        (("--workers", "0"), {}),  # auto, not on a terminal: as under systemd
    ],
)
def test_a_bad_setting_is_a_json_line_when_the_log_is_to_be_json(
    tmp_path: Path, flags: tuple[str, ...], env: dict[str, str]
) -> None:
    done = run_sinkwatch("run", "--once", "--metrics-port", "0", *flags, cwd=tmp_path, env=env)
    assert done.returncode == 2, done.stderr[-4000:]
    message = last_word(done.stderr)  # the only line, and JSON: a log shipper parses every line
    assert message.startswith("sinkwatch: setting 'workers': "), message
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_startup_with_no_flags_in_an_empty_folder_creates_watch_and_queue_and_says_where(tmp_path: Path) -> None:
    cwd = tmp_path / "empty"
    cwd.mkdir()
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("SINKWATCH_")}
    env["PYTHONPATH"] = str(REPO)
    log = tmp_path / "sinkwatch.log"
    with log.open("wb") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", "run", "--metrics-port", str(port)],
            cwd=cwd,
            env=env,
            stdout=handle,
            stderr=handle,
        )
    try:

        def ready() -> bool:
            assert proc.poll() is None, log.read_text()[-4000:]
            try:
                return http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200
            except OSError:
                return False

        wait_for(ready, timeout=60)
        assert sorted(p.name for p in cwd.iterdir()) == ["queue", "watch"]
        messages = [str(r["message"]) for r in records(log.read_text())]
        assert any(f"watching {cwd / 'watch'} -> queue {cwd / 'queue'}" in m for m in messages), messages
        assert any(f"metrics at http://127.0.0.1:{port}/metrics" in m for m in messages), messages

        write_photo(cwd / "watch" / "first.png", small_photo(2))
        wait_for((cwd / "queue" / "first.png").is_file, timeout=60)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0, log.read_text()[-4000:]


def test_a_hole_at_the_end_of_a_file_is_waited_out_then_read_as_it_is_on_the_last_try(tmp_path: Path) -> None:
    # A complete BMP whose black rows a file system stores as a hole (ZFS with compression does): the same as a
    # preallocated file still being filled, until it has stayed so through every retry.
    image = np.zeros((512, 512, 3), np.uint8)
    image[256:] = small_photo(0, height=256, width=512)  # rows are stored bottom-up: the black top half ends it
    encoded = io.BytesIO()
    Image.fromarray(image).save(encoded, format="BMP")
    data = encoded.getvalue()
    source = tmp_path / "gen.bmp"
    with source.open("wb") as file:
        file.truncate(len(data))
        file.write(data[: -(-len(data.rstrip(b"\0")) // 4096) * 4096])  # up to the block the zeros start in
    assert source.read_bytes() == data
    done = run_sinkwatch(
        "process", str(source), "--queue", str(tmp_path / "queue"), "--max-attempts", "3", "--retry-base", "0.05",
        "--log-format", "json", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    waits = [r for r in records(done.stderr) if "unwritten blocks at its end" in r["message"]]
    assert len(waits) == 2, "retried while it could still be a file being written"
    assert [frame.name for frame in frames(tmp_path / "queue")] == ["gen.png"]


def test_a_lost_ledger_keeps_the_outputs_of_sources_whose_names_differ_only_in_case(tmp_path: Path) -> None:
    # Cat.png came first and has Cat.png; CAT.png has CAT-<hash>.png (names are unique case-insensitively). A
    # scan of a fresh ledger meets CAT.png first: it must find its own frame, not take the free "CAT".
    watch, queue = tmp_path / "watch", tmp_path / "queue"
    watch.mkdir()
    run = ("run", "--once", "--watch", str(watch), "--queue", str(queue), "--log-format", "json")
    for index, name in enumerate(["Cat.png", "CAT.png"]):
        write_photo(watch / name, small_photo(index, height=120, width=180))
        assert run_sinkwatch(*run, cwd=tmp_path).returncode == 0
    made = {frame.name: snapshot(queue)[frame.name] for frame in frames(queue)}
    assert len(made) == 2 and "Cat.png" in made, made

    shutil.rmtree(queue / ".sinkwatch" / "state")
    again = run_sinkwatch(*run, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    log = records(again.stderr)
    assert logged(log, "published") == []
    assert sorted(str(r["extra"]["source"]) for r in log if str(r["message"]).startswith("kept ")) == [
        "CAT.png",
        "Cat.png",
    ]
    assert {frame.name: snapshot(queue)[frame.name] for frame in frames(queue)} == made
