"""Fixtures shared by the service tests."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypedDict

import pytest
from loguru import logger
from prometheus_client import CollectorRegistry

from service.comfyui import DEFAULT_SUBFOLDER, ComfyClient
from service.engine import Engine, Limits
from service.ledger import Ledger
from service.metrics import Metrics
from service.pool import WorkerPool
from service.publish import Publisher
from service.rules import load_rules
from service.uploader import Uploads
from tests.fake_comfyui import FakeComfyUI

if TYPE_CHECKING:
    from loguru import Record  # loguru's types live in its stubs only


class FakeClock:
    """A clock that moves only when the test moves it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def comfy() -> Iterator[FakeComfyUI]:
    """A fake ComfyUI server on loopback, checked for internal errors when the test ends."""
    with FakeComfyUI() as fake:
        yield fake
    assert fake.errors == [], "the fake server hit an internal error"


@pytest.fixture
def watch(tmp_path: Path) -> Path:
    """An empty watch folder."""
    folder = tmp_path / "watch"
    folder.mkdir()
    return folder


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    """An open ledger in a state folder of its own."""
    (tmp_path / "state").mkdir()
    with Ledger(tmp_path / "state" / "ledger.sqlite3") as opened:
        yield opened


class Stamp(TypedDict):
    """A source's file stamp, as the ledger's start() and published() take it."""

    size: int
    mtime_ns: int
    ino: int
    ctime_ns: int


def file_stamp(path: Path) -> Stamp:
    """The stamp of the file at ``path`` now."""
    st = path.stat()
    return Stamp(size=st.st_size, mtime_ns=st.st_mtime_ns, ino=st.st_ino, ctime_ns=st.st_ctime_ns)


class IdleEngine(Protocol):
    def __call__(
        self,
        *,
        resolve: Callable[[str], Path],
        queue_size: int = 8,
        wakeup: Callable[[], Future[None]] | None = None,
        ledger: Ledger | None = None,
        force: bool = False,
    ) -> Engine: ...


@pytest.fixture
def idle_engine(tmp_path: Path) -> Iterator[IdleEngine]:
    """Makes an Engine on a real ledger (or the one given) and the shipped rules, for what happens before
    a job runs: its pool starts no process until something is submitted."""
    pool = WorkerPool(1)
    rules = load_rules(None)
    with Ledger(tmp_path / "ledger.sqlite3") as shared:

        def make(
            *,
            resolve: Callable[[str], Path],
            queue_size: int = 8,
            wakeup: Callable[[], Future[None]] | None = None,
            ledger: Ledger | None = None,
            force: bool = False,
        ) -> Engine:
            limits = Limits(
                max_bytes=1 << 30, max_pixels=1 << 30, max_attempts=3, retry_base=1.0, queue_size=queue_size
            )
            return Engine(
                queue=tmp_path / "queue",
                rules=rules,
                ledger=shared if ledger is None else ledger,
                pool=pool,
                metrics=Metrics(CollectorRegistry(), rules=rules.names),
                limits=limits,
                resolve=resolve,
                wakeup=wakeup,
                force=force,
            )

        yield make
    pool.close()


def replace_keeping_mtime(path: Path, content: bytes) -> None:
    """What ``rsync -t`` does: new bytes in a temporary file given the old mtime, renamed over the old file."""
    st = path.stat()
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_bytes(content)
    os.utime(temporary, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(temporary, path)


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """Undo configure_logging after a test: the root logger's handlers and loguru's default sink."""
    handlers = list(logging.getLogger().handlers)
    yield
    logging.getLogger().handlers[:] = handlers
    logger.remove()
    logger.add(sys.stderr)


@pytest.fixture
def publisher(tmp_path: Path) -> Publisher:
    return Publisher(tmp_path / "queue")


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
def logs() -> Iterator[list[Record]]:
    records: list[Record] = []
    sink = logger.add(lambda message: records.append(message.record), level="DEBUG")
    yield records
    logger.remove(sink)


@pytest.fixture
def make_uploads(ledger: Ledger, publisher: Publisher, metrics: Metrics) -> Iterator[Callable[..., Uploads]]:
    """Build Uploads against `url`; every one built is closed after the test."""
    made: list[Uploads] = []

    def make(url: str, *, workflow: dict[str, Any] | None = None, **kwargs: Any) -> Uploads:
        kwargs.setdefault("retry_base", 0.001)
        kwargs.setdefault("retry_cap", 0.01)
        timeout = kwargs.pop("timeout", 5.0)
        subfolder = kwargs.pop("subfolder", DEFAULT_SUBFOLDER)
        uploads = Uploads(
            client=ComfyClient(url, timeout=timeout, subfolder=subfolder),
            ledger=kwargs.pop("ledger", ledger),
            publisher=publisher,
            metrics=metrics,
            workflow=workflow,
            **kwargs,
        )
        made.append(uploads)
        return uploads

    yield make
    for uploads in made:
        uploads.close()
