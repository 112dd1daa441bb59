"""A frame in the queue that is no longer the one sinkwatch wrote (the user edited it in place or put
their own image there) is never replaced: the source's new content is published under a new name.
The frames sinkwatch did write are replaced in place, known by the ledger's hash of them or by their
sidecar; without the ledger's row nothing tells that the source stayed at its path (another image may
have taken it, see test_gone_sources), and its new content goes to a new name too.

Real photographs, a real worker process, real files in a temp queue.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.engine import Candidate, Engine
from service.ledger import Ledger
from tests.conftest import load_photo
from tests.service.conftest import IdleEngine

SOURCE = "cat.png"
PHOTOS = ("chelsea", "coffee", "rocket")

WritePng = Callable[[str, np.ndarray], Path]


@pytest.fixture
def engine(watch: Path, idle_engine: IdleEngine) -> Engine:
    return idle_engine(resolve=lambda key: watch / key)


def publish(engine: Engine, write_png: WritePng, photo: str) -> str:
    """Write `photo` as the source, run it through the engine; the frame's file name."""
    return run(engine, write_png(f"watch/{SOURCE}", load_photo(photo)), "event")


def run(engine: Engine, path: Path, found_by: str) -> str:
    """Offer the source at `path` as found by `found_by` ("event", "startup", ...) and run it; the frame's name."""
    assert engine.offer(Candidate(SOURCE, path, found_by, time.time()))
    deadline = time.monotonic() + 120
    while not engine.idle():
        assert time.monotonic() < deadline, "the job did not finish"
        engine.pump(timeout=0.2)
    entry = engine.ledger.get(SOURCE)
    assert entry is not None and entry.state == "published" and entry.output_name is not None
    return f"{entry.output_name}.png"


def frames(queue: Path) -> list[str]:
    return sorted(p.name for p in queue.glob("*.png"))


def users_edit(frame: Path) -> bytes:
    """The frame flipped upside down, saved over it as an image editor would."""
    from PIL import Image

    with Image.open(frame) as image:
        image.transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(frame)
    return frame.read_bytes()


def sidecar(queue: Path, frame: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((queue / "matrix" / frame.replace(".png", ".json")).read_text())
    return loaded


def test_its_own_frame_is_replaced_in_place(engine: Engine, write_png: WritePng) -> None:
    first = publish(engine, write_png, PHOTOS[0])
    before = (engine.queue / first).read_bytes()

    second = publish(engine, write_png, PHOTOS[1])

    assert second == first == "cat.png"
    assert engine.metrics.registry.get_sample_value("sinkwatch_frames_renamed_total") == 0
    assert frames(engine.queue) == ["cat.png"]
    assert (engine.queue / first).read_bytes() != before


def test_an_edited_frame_is_left_alone_and_the_new_content_gets_a_new_name(engine: Engine, write_png: WritePng) -> None:
    first = publish(engine, write_png, PHOTOS[0])
    edited = users_edit(engine.queue / first)

    second = publish(engine, write_png, PHOTOS[1])

    assert (engine.queue / first).read_bytes() == edited, "the user's edit was overwritten"
    assert second != first and second.startswith("cat-")
    assert engine.metrics.registry.get_sample_value("sinkwatch_frames_renamed_total") == 1
    assert sidecar(engine.queue, second)["source"] == sidecar(engine.queue, second)["source"] | {"key": SOURCE}
    # The new name is the source's from now on: its next content replaces that frame, not a third name.
    third = publish(engine, write_png, PHOTOS[2])
    assert third == second
    assert engine.metrics.registry.get_sample_value("sinkwatch_frames_renamed_total") == 1
    assert frames(engine.queue) == sorted([first, second])
    assert (engine.queue / first).read_bytes() == edited


def test_a_frame_of_someone_elses_content_is_left_alone(engine: Engine, write_png: WritePng) -> None:
    first = publish(engine, write_png, PHOTOS[0])
    theirs = write_png(f"queue/{first}", load_photo("astronaut")).read_bytes()

    second = publish(engine, write_png, PHOTOS[1])

    assert second != first
    assert (engine.queue / first).read_bytes() == theirs


def test_a_publication_cut_short_before_its_frame_still_replaces_the_old_frame(
    engine: Engine, write_png: WritePng
) -> None:
    first = publish(engine, write_png, PHOTOS[0])
    # A crash between the new sidecar and the new frame: the sidecar names a frame that never arrived.
    cut_short = sidecar(engine.queue, first)
    cut_short["output"] = dict(cut_short["output"]) | {"frame_sha256": "0" * 64}
    engine.publisher.write_sidecar(first.removesuffix(".png"), cut_short)

    second = publish(engine, write_png, PHOTOS[1])

    assert second == first, "the old frame, recorded in the ledger, was taken for someone else's"
    assert frames(engine.queue) == [first]


@pytest.mark.parametrize("edited", [False, True], ids=["own frame", "edited frame"])
def test_without_its_ledger_it_knows_its_frames_by_their_sidecars(
    tmp_path: Path, watch: Path, idle_engine: IdleEngine, write_png: WritePng, edited: bool
) -> None:
    first = publish(idle_engine(resolve=lambda key: watch / key), write_png, PHOTOS[0])
    kept = users_edit(tmp_path / "queue" / first) if edited else None
    (tmp_path / "fresh").mkdir()
    with Ledger(tmp_path / "fresh" / "ledger.sqlite3") as fresh:
        second = publish(idle_engine(resolve=lambda key: watch / key, ledger=fresh), write_png, PHOTOS[1])

    if kept is None:
        # Nothing tells that the source stayed at its path (another image may have taken it): its frame stays.
        assert second != first
        assert frames(tmp_path / "queue") == sorted([first, second])
    else:
        assert second != first
        assert (tmp_path / "queue" / first).read_bytes() == kept


def test_a_second_edit_keeps_both_edits(engine: Engine, write_png: WritePng) -> None:
    first = publish(engine, write_png, PHOTOS[0])
    edits = {first: users_edit(engine.queue / first)}
    second = publish(engine, write_png, PHOTOS[1])
    edits[second] = users_edit(engine.queue / second)

    third = publish(engine, write_png, PHOTOS[2])

    assert third not in edits
    assert {name: (engine.queue / name).read_bytes() for name in edits} == edits
    assert frames(engine.queue) == sorted([*edits, third])
