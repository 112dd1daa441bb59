"""Crash recovery on real outputs: a frame published just before the crash is settled from its sidecar,
anything else is done again, a vanished source is forgotten."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from service.ledger import Ledger
from service.publish import Publisher
from service.recovery import recover
from service.rules import load_rules
from service.runner import Job, process_job
from tests.conftest import load_photo

Crashed = tuple[Ledger, Publisher, Path]


@pytest.fixture
def crashed(tmp_path: Path, write_png: Callable[[str, np.ndarray], Path]) -> Iterator[Crashed]:
    """A source published by a worker whose daemon died before it recorded the outcome."""
    source = write_png("watch/cat.png", load_photo("chelsea"))
    queue = tmp_path / "queue"
    rule = load_rules(None).get("default")
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    name = ledger.name_for("cat.png", "cat", exists=lambda _name: False)
    st = source.stat()
    ledger.start(
        "cat.png", size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=None, rule=rule.name, fingerprint=rule.fingerprint
    )
    job = Job(source=source, key="cat.png", name=name, rule=rule, queue=queue, max_bytes=1 << 30, max_pixels=1 << 30)
    assert process_job(job).status == "published"
    assert ledger.get("cat.png").state == "processing"  # type: ignore[union-attr]
    with ledger:
        yield ledger, Publisher(queue), source


def _recover(crashed: Crashed) -> tuple[int, list[str]]:
    ledger, publisher, source = crashed
    requeued: list[str] = []
    settled = recover(
        ledger,
        publisher,
        resolve=lambda key: source.parent / key,
        requeue=lambda entry, _path, _alone: requeued.append(entry.relpath),
    )
    return settled, requeued


def test_a_frame_published_before_the_crash_is_settled_not_made_again(crashed: Crashed) -> None:
    assert _recover(crashed) == (1, [])
    entry = crashed[0].get("cat.png")
    assert entry is not None and entry.state == "published" and entry.output_name == "cat"
    assert entry.rule == "default" and entry.sha256 is not None


def test_a_damaged_frame_is_made_again(crashed: Crashed) -> None:
    frame = crashed[1].frame_path("cat")
    frame.write_bytes(frame.read_bytes()[:-100])
    assert _recover(crashed) == (0, ["cat.png"])


@pytest.mark.parametrize("others", [0, 1, 3])
def test_an_image_cut_short_is_handed_back_alone_only_when_the_run_left_no_other(
    crashed: Crashed, write_png: Callable[[str, np.ndarray], Path], others: int
) -> None:
    """Only then may the run have died of it (an out-of-memory kill of the whole service)."""
    ledger, publisher, source = crashed
    publisher.frame_path("cat").unlink()  # the run died before its frame was written
    for i in range(others):
        other = write_png(f"watch/other_{i}.png", load_photo("coffee")[::8, ::8])
        st = other.stat()
        ledger.start(other.name, size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=None, rule="d", fingerprint="f")
    handed: dict[str, bool] = {}
    assert (
        recover(
            ledger,
            publisher,
            resolve=lambda key: source.parent / key,
            requeue=lambda entry, _path, alone: handed.setdefault(entry.relpath, alone),
        )
        == 0
    )
    assert handed == {"cat.png": others == 0} | {f"other_{i}.png": False for i in range(others)}
    # The engine decides what the kill counts for (tests/service/test_engine_recovery.py).
    assert {entry.relpath for entry in ledger.entries("processing")} == set(handed)


def test_a_source_changed_since_its_frame_is_made_again(crashed: Crashed) -> None:
    source = crashed[2]
    source.write_bytes(source.read_bytes() + b"\0")
    assert _recover(crashed) == (0, ["cat.png"])


def test_a_sidecar_of_another_source_is_not_taken_for_ours(crashed: Crashed) -> None:
    path = crashed[1].sidecar_path("cat")
    sidecar = json.loads(path.read_text(encoding="utf-8"))
    sidecar["source"] |= {"key": "dog.png", "path": str(crashed[2].with_name("dog.png"))}
    path.write_text(json.dumps(sidecar), encoding="utf-8")
    assert _recover(crashed) == (0, ["cat.png"])


def test_a_vanished_source_is_forgotten(crashed: Crashed) -> None:
    crashed[2].unlink()
    assert _recover(crashed) == (0, [])
    assert crashed[0].get("cat.png") is None


def test_a_settled_frame_is_owed_what_a_publication_is_owed_its_upload(crashed: Crashed) -> None:
    # The daemon died after the worker published and before it recorded the outcome: the frame's
    # upload to ComfyUI had not been recorded either, and nothing but recovery can owe it now.
    ledger, publisher, source = crashed
    owed: list[tuple[str, str, int, int]] = []
    settled = recover(
        ledger,
        publisher,
        resolve=lambda key: source.parent / key,
        requeue=lambda _entry, _path, _alone: None,
        published=lambda *upload: owed.append(upload),
    )
    assert settled == 1
    assert owed == [("cat", "cat.png", 832, 480)]


def test_a_sidecar_without_the_frame_size_is_made_again(crashed: Crashed) -> None:
    sidecar = crashed[1].sidecar_path("cat")
    sidecar.write_text(sidecar.read_text(encoding="utf-8").replace('"width": 832', '"width": "832"'), encoding="utf-8")
    assert _recover(crashed) == (0, ["cat.png"])
