"""Who owns the file at a frame's name, decided by the worker just before it publishes: an edit made while
the image was in flight, a link, a publication cut short, a sidecar written under `sinkwatch process`'s
absolute key; and, through the engine, a touched source and a lost ledger after a rename.

Real photographs; real worker processes for the engine cases.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.engine import Engine
from service.ledger import Ledger
from service.ownership import own_sidecar
from service.publish import Publisher
from service.rules import load_rules
from service.runner import Job, Outcome, process_job
from tests.conftest import load_photo
from tests.service.conftest import IdleEngine
from tests.service.test_foreign_frames import PHOTOS, engine, frames, publish, users_edit

__all__ = ["engine"]  # the fixture, shared with test_foreign_frames

WritePng = Callable[[str, np.ndarray], Path]


def run_job(source: Path, queue: Path, *, key: str = "cat.png", frame_sha256: str | None = None) -> Outcome:
    rule = load_rules(None).get("default")
    job = Job(
        source=source,
        key=key,
        name="cat",
        rule=rule,
        queue=queue,
        max_bytes=1 << 30,
        max_pixels=1 << 30,
        frame_sha256=frame_sha256,
    )
    return process_job(job)


def outputs(queue: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in (queue / "cat.png", *sorted((queue / "matrix").iterdir()))}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_edit_made_while_the_image_was_in_flight_is_not_overwritten(tmp_path: Path, write_png: WritePng) -> None:
    queue = tmp_path / "queue"
    first = run_job(write_png("watch/cat.png", load_photo(PHOTOS[0])), queue)
    assert first.status == "published" and first.frame_sha256 == digest(queue / "cat.png")
    # Dispatched with the ledger's hash of the frame; the user saves an edit before the worker publishes.
    users_edit(queue / "cat.png")
    before = outputs(queue)

    outcome = run_job(write_png("watch/cat.png", load_photo(PHOTOS[1])), queue, frame_sha256=first.frame_sha256)

    assert outcome.status == "name_taken"
    assert outputs(queue) == before, "the edit, its heatmap or its sidecar was replaced"


def test_a_link_at_the_frames_name_is_left_alone_even_when_it_leads_nowhere(
    tmp_path: Path, write_png: WritePng
) -> None:
    queue = tmp_path / "queue"
    queue.mkdir()
    (queue / "cat.png").symlink_to("/nonexistent/share/cat.png")

    outcome = run_job(write_png("watch/cat.png", load_photo(PHOTOS[0])), queue)

    assert outcome.status == "name_taken"
    assert os.readlink(queue / "cat.png") == "/nonexistent/share/cat.png"


def test_a_publication_cut_short_is_known_by_the_frame_its_sidecar_replaces(
    tmp_path: Path, write_png: WritePng
) -> None:
    queue = tmp_path / "queue"
    assert run_job(write_png("watch/cat.png", load_photo(PHOTOS[0])), queue).status == "published"
    old = digest(queue / "cat.png")
    assert run_job(write_png("watch/cat.png", load_photo(PHOTOS[1])), queue).status == "published"
    sidecar: dict[str, Any] = json.loads((queue / "matrix" / "cat.json").read_text())
    assert sidecar["output"]["replaces_frame_sha256"] == old
    # What a crash between the new sidecar and the new frame leaves: the frame it was replacing under a
    # sidecar that names a frame which never arrived; and no ledger hash (a row from before schema 4).
    sidecar["output"] |= {"frame_sha256": "0" * 64, "replaces_frame_sha256": digest(queue / "cat.png")}
    (queue / "matrix" / "cat.json").write_text(json.dumps(sidecar))

    outcome = run_job(write_png("watch/cat.png", load_photo(PHOTOS[2])), queue)

    assert outcome.status == "published"
    assert digest(queue / "cat.png") == outcome.frame_sha256


def test_a_sidecar_written_under_the_absolute_key_of_sinkwatch_process_is_its_own(
    tmp_path: Path, write_png: WritePng
) -> None:
    queue = tmp_path / "queue"
    source = write_png("watch/cat.png", load_photo(PHOTOS[0]))
    assert run_job(source, queue, key=str(source)).status == "published"

    # The daemon adopted the row under the relative key; the ledger's row has no frame hash.
    outcome = run_job(write_png("watch/cat.png", load_photo(PHOTOS[1])), queue, key="cat.png")

    assert outcome.status == "published"


def test_the_daemons_sidecar_is_its_own_for_sinkwatch_process_given_the_same_file_by_another_path(
    tmp_path: Path, write_png: WritePng, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`process` on a ledger of its own, given the daemon's file by a relative path (no --watch, a queue whose
    daemon has not recorded its watch folder yet): the frame is that file's, not someone else's."""
    queue = tmp_path / "queue"
    source = write_png("watch/cat.png", load_photo(PHOTOS[0]))
    assert run_job(source, queue, key="cat.png").status == "published"  # by the daemon, its path absolute
    publisher = Publisher(queue)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    given = Path("../watch/cat.png")

    assert own_sidecar(publisher, "cat", str(source.resolve()), given) is not None
    assert own_sidecar(publisher, "cat", str(tmp_path / "other.png"), tmp_path / "other.png") is None


def test_a_touched_source_after_an_edit_keeps_its_name_and_publishes_nothing(
    engine: Engine, write_png: WritePng
) -> None:
    first = publish(engine, write_png, PHOTOS[0])
    edited = users_edit(engine.queue / first)
    source = engine.resolve("cat.png")
    st = source.stat()
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))

    assert publish(engine, write_png_same(source), PHOTOS[0]) == first

    assert frames(engine.queue) == [first]
    assert (engine.queue / first).read_bytes() == edited
    assert engine.counts["skipped"] == 1


def write_png_same(source: Path) -> WritePng:
    """A writer that leaves the source as it is (its bytes unchanged, its new mtime kept)."""

    def keep(_name: str, _rgb: np.ndarray) -> Path:
        return source

    return keep


def test_without_its_ledger_a_changed_source_keeps_its_earlier_frames(
    tmp_path: Path, watch: Path, idle_engine: IdleEngine, write_png: WritePng
) -> None:
    engine = idle_engine(resolve=lambda key: watch / key)
    first = publish(engine, write_png, PHOTOS[0])
    edited = users_edit(tmp_path / "queue" / first)
    second = publish(engine, write_png, PHOTOS[1])
    assert second != first
    (tmp_path / "fresh").mkdir()
    with Ledger(tmp_path / "fresh" / "ledger.sqlite3") as fresh:
        third = publish(idle_engine(resolve=lambda key: watch / key, ledger=fresh), write_png, PHOTOS[2])

    # Nothing tells that the source stayed at its path since (another image may have taken it): both stay.
    assert third not in (first, second)
    assert frames(tmp_path / "queue") == sorted([first, second, third])
    assert (tmp_path / "queue" / first).read_bytes() == edited


def test_a_lost_name_takes_the_recorded_frame_hash_with_it(ledger: Ledger) -> None:
    stamp = {"size": 1, "mtime_ns": 2, "ino": 3, "ctime_ns": 4}
    assert ledger.name_for("cat.png", "cat", exists=lambda _n: False) == "cat"
    ledger.published("cat.png", **stamp, sha256="0" * 64, rule="default", fingerprint="f", frame_sha256="1" * 64)

    new = ledger.name_for("cat.png", "cat", exists=lambda _n: False, instead_of="cat")

    entry = ledger.get("cat.png")
    assert entry is not None and entry.output_name == new != "cat"
    assert entry.frame_sha256 is None, "the hash of the frame under the lost name would vouch for the new name's"
