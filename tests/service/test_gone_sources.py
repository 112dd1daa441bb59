"""A source that left its path (deleted, moved away) and a file that then appears there: another image, as
when ComfyUI, its output folder cleared, counts its names up again from the highest one left. The frame of
the image before stays in the queue and the new one goes to a new name; an edit saved over a source that
never left still replaces its frame, and the same image put back keeps it.

Real photographs, a real worker process, real files; the watch events as the watcher queues them.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from service.discovery import Discovery
from service.engine import Candidate, Engine
from service.ledger import Ledger
from service.selection import Selection
from service.stability import StabilityTracker
from service.watcher import EventQueue
from tests.conftest import load_photo
from tests.service.conftest import Stamp
from tests.service.test_foreign_frames import PHOTOS, SOURCE, engine, frames, publish, run, sidecar

__all__ = ["engine"]  # the fixture

WritePng = Callable[[str, np.ndarray], Path]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_image_at_the_path_of_a_deleted_source_goes_to_a_new_name_and_the_old_frame_stays(
    engine: Engine, watch: Path, write_png: WritePng
) -> None:
    first = publish(engine, write_png, PHOTOS[0])
    kept = (engine.queue / first).read_bytes()
    names = [first]
    for photo in PHOTOS[1:]:
        (watch / SOURCE).unlink()
        engine.ledger.mark_gone([SOURCE])
        names.append(publish(engine, write_png, photo))
        assert sidecar(engine.queue, names[-1])["source"]["sha256"] == sha256(watch / SOURCE)
        entry = engine.ledger.get(SOURCE)
        assert entry is not None and entry.gone is None, "published again: no longer gone"

    assert len(set(names)) == 3, names
    assert frames(engine.queue) == sorted(names)
    assert (engine.queue / first).read_bytes() == kept
    assert engine.metrics.registry.get_sample_value("sinkwatch_frames_renamed_total") == 2


def test_the_same_image_put_back_keeps_its_frame(engine: Engine, watch: Path, write_png: WritePng) -> None:
    first = publish(engine, write_png, PHOTOS[0])
    (watch / SOURCE).unlink()
    engine.ledger.mark_gone([SOURCE])

    assert publish(engine, write_png, PHOTOS[0]) == first
    assert frames(engine.queue) == [first]
    entry = engine.ledger.get(SOURCE)
    assert entry is not None and entry.gone is None


def test_another_file_found_by_a_scan_is_another_image_and_one_a_watch_event_told_of_is_an_edit(
    engine: Engine, watch: Path, write_png: WritePng
) -> None:
    """A rename over the source replaces its inode. Seen by the watch, it is an edit saved by an editor; found
    by the startup scan, it may as well be another image put there while the daemon was stopped."""
    first = publish(engine, write_png, PHOTOS[0])
    replacement = write_png("elsewhere/cat.png", load_photo(PHOTOS[1]))
    os.replace(replacement, watch / SOURCE)

    second = run(engine, watch / SOURCE, "startup")
    assert second != first and frames(engine.queue) == sorted([first, second])

    replacement = write_png("elsewhere/cat.png", load_photo(PHOTOS[2]))
    os.replace(replacement, watch / SOURCE)
    assert run(engine, watch / SOURCE, "event") == second, "an edit seen by the watch replaces its frame"
    assert sidecar(engine.queue, second)["source"]["sha256"] == sha256(watch / SOURCE)
    assert frames(engine.queue) == sorted([first, second])


@pytest.mark.parametrize("found_by", ["startup", "scan", "retry", "batch", "polled event"])
def test_another_file_found_where_no_event_told_how_it_came_is_another_image_though_its_inode_is_reused(
    engine: Engine, watch: Path, write_png: WritePng, found_by: str
) -> None:
    """Deleted and made anew while the daemon was stopped (or killed, or with `process`, or between two polls):
    ext4 gives the new file the inode just freed, so only its birth time tells it from an edit."""
    first = publish(engine, write_png, PHOTOS[0])
    (watch / SOURCE).unlink()
    new = write_png(f"watch/{SOURCE}", load_photo(PHOTOS[1]))
    if found_by == "polled event":
        engine.events_tell_departures = False
    second = run(engine, new, "event" if found_by == "polled event" else found_by)

    assert second != first and frames(engine.queue) == sorted([first, second])


def test_an_edit_in_place_found_by_a_scan_is_an_edit(engine: Engine, watch: Path, write_png: WritePng) -> None:
    first = publish(engine, write_png, PHOTOS[0])
    source = watch / SOURCE
    source.write_bytes(write_png("elsewhere/x.png", load_photo(PHOTOS[1])).read_bytes())  # the same file, rewritten

    assert run(engine, source, "startup") == first
    assert frames(engine.queue) == [first]


def test_a_watch_event_outranks_a_scan_that_found_the_same_file(
    engine: Engine, watch: Path, write_png: WritePng
) -> None:
    """The event tells how the file came (an editor's save by a rename); the scan would see only a new file."""
    path = write_png(f"watch/{SOURCE}", load_photo(PHOTOS[0]))
    for first, second in (("scan", "event"), ("event", "scan")):
        engine.pending.clear()
        assert engine.offer(Candidate(SOURCE, path, first, time.time()))
        assert engine.offer(Candidate(SOURCE, path, second, time.time()))
        assert [candidate.source for candidate in engine.pending.values()] == ["event"], (first, second)


def test_a_deleted_event_marks_the_source_gone_even_when_a_new_file_is_there_already(
    watch: Path, engine: Engine, write_png: WritePng
) -> None:
    for name in ("gone.png", "replaced.png"):
        path = write_png(f"watch/{name}", load_photo(PHOTOS[0]))
        st = path.stat()
        engine.ledger.published(name, size=st.st_size, mtime_ns=st.st_mtime_ns, ino=st.st_ino,
                                ctime_ns=st.st_ctime_ns, sha256="0" * 64, rule="default", fingerprint="f")  # fmt: skip
    events = EventQueue(maxsize=8)
    found = Discovery(
        selection=Selection(watch, include=("*.png",)),
        events=events,
        tracker=StabilityTracker(settle=1.0),
        engine=engine,
    )
    (watch / "gone.png").unlink()
    (watch / "replaced.png").unlink()
    write_png("watch/replaced.png", load_photo(PHOTOS[1]))
    for name in ("gone.png", "replaced.png", "never-known.png"):
        events.put(("deleted", watch / name))

    found.take_events()

    gone = {name: getattr(engine.ledger.get(name), "gone", "no row") for name in ("gone.png", "replaced.png")}
    assert None not in gone.values() and "no row" not in gone.values(), gone
    assert engine.ledger.get("never-known.png") is None


def test_a_lost_name_is_retired_for_every_source(ledger: Ledger) -> None:
    """Its file stays in the queue (the frame of an earlier image, someone's file): no source gets it again, not
    even the one that lost it, to which the earlier image's frame would look like its own."""
    free: Callable[[str], bool] = lambda _name: False  # noqa: E731 - nothing in the queue at all
    assert ledger.name_for("cat.png", "cat", exists=free) == "cat"
    second = ledger.name_for("cat.png", "cat", exists=free, instead_of="cat")
    third = ledger.name_for("cat.png", "cat", exists=free, instead_of=second)

    assert len({"cat", second, third}) == 3
    assert ledger.name_for("cat.png", "cat", exists=free) == third
    assert ledger.name_for("other/cat.png", "cat", exists=free) not in ("cat", second, third)


def test_a_source_is_gone_from_when_it_left_until_it_is_published_again(ledger: Ledger) -> None:
    stamp: Stamp = {"size": 1, "mtime_ns": 2, "ino": 3, "ctime_ns": 4}
    ledger.published("cat.png", **stamp, sha256="0" * 64, rule="default", fingerprint="f")
    ledger.mark_gone(["cat.png", "unknown.png"])
    left = ledger.get("cat.png")
    assert left is not None and left.gone is not None and ledger.get("unknown.png") is None

    ledger.mark_gone(["cat.png"])
    ledger.start("cat.png", **stamp, sha256=None, rule="default", fingerprint="f")
    ledger.retry("cat.png", reason="incomplete", message="", next_attempt=0.0)
    waiting = ledger.get("cat.png")
    assert waiting is not None and waiting.gone is not None and waiting.gone >= left.gone, "its latest departure"

    ledger.published("cat.png", **stamp, sha256="1" * 64, rule="default", fingerprint="f")
    back = ledger.get("cat.png")
    assert back is not None and back.gone is None

    # Gone again while an attempt runs (deleted while a worker reads it): its publication does not undo that,
    # also when the attempt was of a file that had taken the path of one gone before.
    for already_gone in (False, True):
        if already_gone:
            ledger.mark_gone(["cat.png"])
        ledger.start("cat.png", **stamp, sha256=None, rule="default", fingerprint="f")
        ledger.mark_gone(["cat.png"])
        ledger.published("cat.png", **stamp, sha256="2" * 64, rule="default", fingerprint="f")
        again = ledger.get("cat.png")
        assert again is not None and again.gone is not None, already_gone
        ledger.published("cat.png", **stamp, sha256="2" * 64, rule="default", fingerprint="f")
