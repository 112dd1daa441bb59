"""The real daemon in a subprocess on real temp folders, for end-to-end tests."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_for

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class DaemonProcess:
    """`sinkwatch run` as a user starts it, with JSON logs captured to a file."""

    def __init__(self, watch: Path, queue: Path, log: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.watch, self.queue, self.log = watch, queue, log
        self.port = free_port()
        self.args = [
            sys.executable, "-m", "service", "run",
            "--watch", str(watch), "--queue", str(queue),
            "--metrics-port", str(self.port), "--log-format", "json", "--log-level", "DEBUG",
            "--workers", "2", "--settle-seconds", "0.3",
            *args,
        ]  # fmt: skip
        self.env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, wait_ready: bool = True) -> DaemonProcess:
        handle = self.log.open("ab")
        self.proc = subprocess.Popen(self.args, stdout=handle, stderr=handle, env=self.env, cwd=self.watch.parent)
        handle.close()
        if wait_ready:
            wait_for(self.ready, timeout=60)
        return self

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"daemon exited early with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(self.url + "/readyz", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, *, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)

    def records(self) -> list[dict[str, object]]:
        """The JSON log records written so far."""
        out = []
        for line in self.log.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                out.append(json.loads(line)["record"])
            except (ValueError, KeyError):
                continue
        return out

    def messages(self) -> list[str]:
        return [str(r["message"]) for r in self.records()]


def frames(queue: Path) -> list[Path]:
    """Top-level files of the queue: exactly what ComfyUI's LoadImage lists."""
    return sorted(p for p in queue.iterdir() if p.is_file())


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Content hash and mtime of every file below `folder`."""
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    watch = tmp_path / "watch"
    queue = tmp_path / "queue"
    watch.mkdir()
    return watch, queue


@pytest.fixture
def daemon(folders: tuple[Path, Path], tmp_path: Path) -> Iterator[DaemonProcess]:
    """A daemon on `folders`, not started; stopped (SIGTERM) after the test, which must exit 0."""
    watch, queue = folders
    proc = DaemonProcess(watch, queue, tmp_path / "daemon.log")
    yield proc
    if proc.proc is not None and proc.proc.poll() is None:
        code = proc.stop()
        assert code == 0, proc.log.read_text()[-4000:]


def wait_published(queue: Path, count: int, *, timeout: float = 90) -> list[Path]:
    def enough() -> list[Path] | None:
        found = frames(queue) if queue.exists() else []
        return found if len(found) >= count else None

    result = wait_for(enough, timeout=timeout)
    assert isinstance(result, list)
    return result

