"""One sinkwatch per state folder and per queue folder, checked against real second processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.errors import ConfigError, FolderBusy
from service.lock import InstanceLock, QueueLock

REPO = Path(__file__).resolve().parents[2]

# Tries the lock (of a state folder, or with "queue" of a queue folder) once and reports;
# with "hold", keeps it until stdin closes.
CHILD = r"""
import sys
from pathlib import Path
from service.errors import ConfigError
from service.lock import InstanceLock, QueueLock

lock = QueueLock(Path(sys.argv[1])) if sys.argv[3] == "queue" else InstanceLock(Path(sys.argv[1]))
try:
    lock.acquire()
except ConfigError as exc:
    print(f"refused {exc}", flush=True)
    sys.exit(3)
print("locked", flush=True)
if sys.argv[2] == "hold":
    sys.stdin.read()
lock.release()
"""


def child(folder: Path, mode: str, kind: str = "state") -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(folder), mode, kind],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def try_once(folder: Path, kind: str = "state") -> tuple[int, str]:
    proc = child(folder, "once", kind)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, 3), err
    return proc.returncode, out.strip()


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """A second process holding the lock on tmp_path until the test ends."""
    proc = child(tmp_path, "hold")
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=60)


def test_a_second_process_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    with InstanceLock(tmp_path) as lock:
        assert lock.held
        code, out = try_once(tmp_path)
    assert code == 3
    assert out == f"refused another sinkwatch (pid {os.getpid()}) already uses {tmp_path}"


def test_this_process_is_refused_while_another_holds_it(tmp_path: Path, holder: subprocess.Popen[str]) -> None:
    lock = InstanceLock(tmp_path)
    with pytest.raises(FolderBusy) as raised:
        lock.acquire()
    assert str(raised.value) == f"another sinkwatch (pid {holder.pid}) already uses {tmp_path}"
    assert raised.value.reason == "busy"
    assert not lock.held


def test_release_lets_the_next_one_in(tmp_path: Path) -> None:
    lock = InstanceLock(tmp_path)
    lock.acquire()
    lock.acquire()  # holding it already is fine
    lock.release()
    assert try_once(tmp_path) == (0, "locked")
    lock.release()  # twice is harmless
    with lock:
        assert try_once(tmp_path)[0] == 3
    assert try_once(tmp_path) == (0, "locked")


def test_a_holder_killed_with_sigkill_leaves_no_stale_lock(tmp_path: Path, holder: subprocess.Popen[str]) -> None:
    assert (tmp_path / "sinkwatch.lock").read_text().strip() == str(holder.pid)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    assert (tmp_path / "sinkwatch.lock").exists(), "the file stays; the kernel dropped the lock"
    with InstanceLock(tmp_path):
        assert (tmp_path / "sinkwatch.lock").read_text().strip() == str(os.getpid())


def test_an_unusable_state_folder_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot open the lock file"):
        InstanceLock(tmp_path / "absent").acquire()


def test_a_lock_whose_folder_was_deleted_is_lost_and_taken_again(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    lock = InstanceLock(state)
    lock.acquire()
    try:
        assert not lock.lost()
        subprocess.run(["rm", "-rf", str(state)], check=True)
        assert lock.lost()

        state.write_text("a file where the state folder was")
        with pytest.raises(ConfigError, match="cannot create the lock's folder again"):
            lock.reacquire()
        state.unlink()

        lock.reacquire()
        assert not lock.lost()
        code, out = try_once(state)
        assert code == 3 and out.startswith("refused"), out
    finally:
        lock.release()


def test_a_second_process_is_refused_the_queue_folder_with_the_holders_pid(tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    queue.mkdir()
    with QueueLock(queue):
        code, out = try_once(queue, "queue")
    assert code == 3
    assert out == f"refused another sinkwatch (pid {os.getpid()}) already uses the queue folder {queue}"
    assert try_once(queue, "queue") == (0, "locked")


def test_the_queue_lock_makes_its_folder_when_the_state_folder_is_elsewhere(tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    queue.mkdir()
    with QueueLock(queue) as lock:
        assert lock.path == queue / ".sinkwatch" / "queue.lock"
        assert lock.path.read_text().strip() == str(os.getpid())
    with pytest.raises(ConfigError, match="cannot create the queue's lock folder"):
        QueueLock(tmp_path / "absent").acquire()
