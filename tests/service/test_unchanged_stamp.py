"""A source is known again unchanged by its whole file stamp, and a stamp that differs costs a hash, never a frame.

`rsync -t` and `cp -p` bring new bytes with the old size and mtime; a `chmod` or a `touch` back to the same mtime
changes nothing in the bytes. Real files, a real ledger, the real runner in this process.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict

import pytest

from service import runner, unchanged
from service.decode import DecodedImage, decode_file
from service.ledger import Ledger
from service.rules import load_rules
from service.runner import Job, Outcome, process_job
from tests.conftest import photo_file
from tests.service.conftest import replace_keeping_mtime


class FileStamp(TypedDict):
    size: int
    mtime_ns: int
    ino: int
    ctime_ns: int


def stamp(path: Path) -> FileStamp:
    st = path.stat()
    return FileStamp(size=st.st_size, mtime_ns=st.st_mtime_ns, ino=st.st_ino, ctime_ns=st.st_ctime_ns)


def publish(ledger: Ledger, path: Path) -> None:
    """Record `path` as published, the way `service.outcomes` records a worker's outcome."""
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    ledger.published(path.name, **stamp(path), sha256=sha256, rule="default", fingerprint="f")


def done(ledger: Ledger, path: Path, source: str = "scan") -> bool:
    return unchanged.done(ledger, [(path.name, path)], source=source) == {path.name}


def until_ctime_moves(path: Path, change: Callable[[], None]) -> None:
    """Make `change`, again until the ctime differs: a kernel with a coarse clock may give two changes one tick."""
    recorded = path.stat().st_ctime_ns
    change()
    while path.stat().st_ctime_ns == recorded:
        change()


def cp_p_in_place(path: Path, content: bytes) -> None:
    """New bytes written into the same inode, then the old mtime set back."""
    st = path.stat()

    def write() -> None:
        path.write_bytes(content)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    until_ctime_moves(path, write)


@pytest.fixture
def source(watch: Path) -> Path:
    path = watch / "img.png"
    path.write_bytes(photo_file("chelsea").read_bytes())
    return path


@pytest.mark.parametrize("copy", [replace_keeping_mtime, cp_p_in_place])
def test_new_bytes_of_the_same_size_and_mtime_are_not_taken_for_done(
    ledger: Ledger, source: Path, copy: Callable[[Path, bytes], None]
) -> None:
    publish(ledger, source)
    assert done(ledger, source)
    before = source.stat()
    copy(source, source.read_bytes()[::-1])
    after = source.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    for found_by in ("scan", "event", "retry", "startup"):
        assert not done(ledger, source, found_by), found_by


@pytest.mark.parametrize("state", ["rejected", "retry"])
def test_other_states_see_the_replacement_too(ledger: Ledger, source: Path, state: str) -> None:
    ledger.start(source.name, **stamp(source), sha256=None, rule="default", fingerprint="f")
    if state == "rejected":
        ledger.rejected(source.name, reason="corrupt", message="")
    else:
        ledger.retry(source.name, reason="incomplete", message="", next_attempt=1e12)
    assert done(ledger, source)  # unchanged: rejected for good, or its scheduled retry will come
    replace_keeping_mtime(source, source.read_bytes()[::-1])
    assert not done(ledger, source)


def test_a_row_recorded_before_inodes_were_is_trusted_as_it_was_then_pinned(ledger: Ledger, source: Path) -> None:
    # An upgrade must not send every processed file of the watch folder to the workers to be hashed.
    st = source.stat()
    ledger.published(source.name, size=st.st_size, mtime_ns=st.st_mtime_ns, sha256="0" * 64, rule="d", fingerprint="f")
    assert ledger.stamps([source.name])[source.name].ino is None
    assert done(ledger, source)
    assert ledger.stamps([source.name])[source.name].file == (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
    replace_keeping_mtime(source, source.read_bytes()[::-1])
    assert not done(ledger, source), "once pinned, a replacement of the same size and mtime is seen"


def test_a_row_recorded_before_inodes_were_is_not_trusted_once_size_or_mtime_moved(
    ledger: Ledger, source: Path
) -> None:
    st = source.stat()
    ledger.published(source.name, size=st.st_size, mtime_ns=st.st_mtime_ns - 1, sha256="0", rule="d", fingerprint="f")
    assert not done(ledger, source)
    assert ledger.stamps([source.name])[source.name].ino is None, "nothing pinned on a file that changed"


def job(source: Path, queue: Path, *, known: str | None) -> Job:
    rule = load_rules(None).get("default")
    return Job(
        source=source,
        key=source.name,
        name=source.stem,
        rule=rule,
        queue=queue,
        max_bytes=1 << 30,
        max_pixels=1 << 30,
        known_sha256=known,
    )


def no_decoding(*_args: object, **_kwargs: object) -> None:
    raise AssertionError("the same bytes were decoded")


@pytest.mark.parametrize(
    "change",
    [
        lambda path: until_ctime_moves(path, lambda: path.chmod(0o600)),
        lambda path: until_ctime_moves(path, lambda: os.utime(path, ns=(0, path.stat().st_mtime_ns))),
        lambda path: cp_p_in_place(path, path.read_bytes()),
    ],
    ids=["chmod", "touch-same-mtime", "cp-p-same-bytes"],
)
def test_the_same_bytes_under_a_new_stamp_are_skipped_unread_and_done_once_recorded(
    ledger: Ledger, source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: Callable[[Path], None]
) -> None:
    publish(ledger, source)
    known = ledger.stamps([source.name])
    change(source)
    assert not done(ledger, source), "a new stamp: the content is checked"
    monkeypatch.setattr(runner, "decode_file", no_decoding)
    queue = tmp_path / "queue"
    entry = ledger.get(source.name)
    assert entry is not None and entry.sha256 is not None

    outcome = process_job(job(source, queue, known=entry.sha256))

    assert (outcome.status, outcome.sha256, outcome.error) == ("skipped", entry.sha256, None)
    assert not queue.exists(), "nothing published, not even the queue folder"
    recorded = stamp(source)
    assert (outcome.size, outcome.mtime_ns, outcome.ino, outcome.ctime_ns) == tuple(recorded.values())
    ledger.published(source.name, **recorded, sha256=entry.sha256, rule="default", fingerprint="f")
    assert done(ledger, source), "the refreshed stamp is trusted again"
    assert ledger.stamps([source.name]) != known


def test_new_bytes_under_a_known_hash_are_processed(source: Path, tmp_path: Path) -> None:
    outcome = process_job(job(source, tmp_path / "queue", known="0" * 64))
    assert outcome.status == "published", outcome.error
    assert outcome.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()


def test_a_fifo_in_the_place_of_a_published_source_is_rejected_not_waited_on(watch: Path, tmp_path: Path) -> None:
    fifo = watch / "img.png"
    os.mkfifo(fifo)
    outcome = process_job(job(fifo, tmp_path / "queue", known="0" * 64))
    assert (outcome.status, outcome.reason) == ("rejected", "not_image")


def test_a_replacement_of_the_same_size_and_mtime_while_read_is_tried_again(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def decode_then_replace(path: Path, **kwargs: Any) -> DecodedImage:
        decoded = decode_file(path, **kwargs)
        replace_keeping_mtime(path, path.read_bytes()[::-1])
        return decoded

    monkeypatch.setattr(runner, "decode_file", decode_then_replace)
    outcome: Outcome = process_job(job(source, tmp_path / "queue", known=None))
    assert (outcome.status, outcome.reason) == ("retry", "incomplete"), outcome.error
    assert not (tmp_path / "queue").exists()
