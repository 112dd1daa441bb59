"""service.discovery: watch events and folder scans become candidates offered to a real engine.

Real watch folder, selection, event queue, stability tracker and engine (its pool never starts a
process: nothing is dispatched here); the engine's pending queue is what the tests read.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from service.discovery import EVENTS_PER_TURN, Discovery
from service.engine import Engine
from service.selection import Selection
from service.stability import StabilityTracker
from service.watcher import EventQueue
from tests.conftest import photo_file
from tests.service.conftest import IdleEngine, file_stamp

QUEUE_SIZE = 3
SETTLE = 1.0


class Found:
    """A Discovery and what it feeds; `now` is what its clock and its tracker's clock read."""

    def __init__(self, watch: Path, engine: Engine) -> None:
        self.watch = watch
        self.engine = engine
        self.now = 100.0
        self.events = EventQueue(maxsize=EVENTS_PER_TURN + 8)
        self.tracker = StabilityTracker(settle=SETTLE, clock=self.clock)
        self.discovery = Discovery(
            selection=Selection(watch, include=("*.png",)),
            events=self.events,
            tracker=self.tracker,
            engine=engine,
            clock=self.clock,
        )

    def clock(self) -> float:
        return self.now

    def pending(self) -> dict[str, str]:
        """Candidates queued in the engine: key -> how they were found."""
        return {key: candidate.source for key, candidate in self.engine.pending.items()}

    def discovered(self, source: str) -> float | None:
        return self.engine.metrics.registry.get_sample_value("sinkwatch_images_discovered_total", {"source": source})


@pytest.fixture
def found(tmp_path: Path, idle_engine: IdleEngine) -> Found:
    watch = tmp_path / "watch"
    watch.mkdir()
    return Found(watch, idle_engine(resolve=lambda key: watch / key, queue_size=QUEUE_SIZE))


def drop(found: Found, *names: str) -> list[Path]:
    """Real PNGs written into the watch folder."""
    paths = [found.watch / name for name in names]
    for path in paths:
        shutil.copyfile(photo_file("chelsea"), path)
    return paths


# --- watch events -------------------------------------------------------------------------------


def test_a_file_found_again_between_the_tries_of_its_slow_writer_counts_as_one_image(found: Found) -> None:
    """Each pause of a slow writer made a closed event, a try that found the file cut short, and one more image
    discovered: 43 for 3 images in a review."""
    [path] = drop(found, "a.png")
    ledger = found.engine.ledger
    for pause in range(4):
        found.events.put(("closed", path))
        found.discovery.take_events()
        assert found.pending() == {"a.png": "event"}, pause
        found.engine.pending.clear()  # dispatched: the file is cut short, it waits for its retry
        ledger.start("a.png", **file_stamp(path), sha256=None, rule="default", fingerprint="f")
        ledger.retry("a.png", reason="incomplete", message="cut short", next_attempt=found.now + 60)
        with path.open("ab") as more:
            more.write(b"the writer goes on")
    assert found.discovered("event") == 1
    # Once settled, new content at the path is another image found.
    ledger.published("a.png", **file_stamp(path), sha256="0" * 64, rule="default", fingerprint="f")
    shutil.copyfile(photo_file("coffee"), path)
    found.events.put(("closed", path))
    found.discovery.take_events()
    assert found.pending() == {"a.png": "event"}
    assert found.discovered("event") == 2


def test_a_closed_file_is_offered_at_once(found: Found) -> None:
    [path] = drop(found, "a.png")
    found.events.put(("closed", path))
    found.discovery.take_events()
    assert found.pending() == {"a.png": "event"}
    assert found.engine.pending["a.png"].path == path
    assert found.discovered("event") == 1


def test_a_created_file_is_offered_once_it_has_settled(found: Found) -> None:
    [path] = drop(found, "a.png")
    found.events.put(("created", path))
    found.discovery.take_events()
    assert found.pending() == {} and found.tracker.pending() == 1
    found.now += SETTLE / 2
    found.discovery.take_events()
    assert found.pending() == {}, "offered before it settled"
    found.now += SETTLE / 2
    found.discovery.take_events()
    assert found.pending() == {"a.png": "event"} and found.tracker.pending() == 0


def test_a_settled_file_starts_its_publish_latency_at_its_event_not_when_it_settled(found: Found) -> None:
    # sinkwatch_publish_latency_seconds promises to include the settle delay.
    [path] = drop(found, "a.png")
    found.events.put(("moved", path))
    found.discovery.take_events()
    found.now += SETTLE + 0.5
    before = time.time()
    found.discovery.take_events()
    after = time.time()
    seen_at = found.engine.pending["a.png"].seen_at
    assert before - (SETTLE + 0.5) <= seen_at <= after - (SETTLE + 0.5)


def test_a_close_after_a_create_skips_the_settle_wait(found: Found) -> None:
    [path] = drop(found, "a.png")
    found.events.put(("created", path))
    found.events.put(("closed", path))
    found.discovery.take_events()
    assert found.pending() == {"a.png": "event"}
    assert found.tracker.pending() == 0, "the tracker still waits for a file already offered"


def test_events_for_files_outside_the_selection_are_dropped(found: Found, tmp_path: Path) -> None:
    drop(found, ".hidden.png")
    (found.watch / "notes.txt").write_text("not an image", encoding="utf-8")
    outside = tmp_path / "elsewhere.png"
    shutil.copyfile(photo_file("chelsea"), outside)
    for path in (found.watch / ".hidden.png", found.watch / "notes.txt", outside):
        found.events.put(("closed", path))
        found.events.put(("created", path))
    found.now += SETTLE
    found.discovery.take_events()
    assert found.pending() == {} and found.tracker.pending() == 0


def test_a_full_engine_flags_the_events_as_lost_so_that_a_scan_finds_them(found: Found) -> None:
    paths = drop(found, *(f"{n}.png" for n in range(QUEUE_SIZE + 1)))
    for path in paths:
        found.events.put(("closed", path))
    found.discovery.take_events()
    assert list(found.pending()) == [f"{n}.png" for n in range(QUEUE_SIZE)]
    assert found.events.take_overflow()


def test_a_settled_file_the_full_engine_refuses_is_flagged_too(found: Found) -> None:
    *first, late = drop(found, *(f"{n}.png" for n in range(QUEUE_SIZE + 1)))
    found.events.put(("created", late))
    for path in first:
        found.events.put(("closed", path))
    found.discovery.take_events()
    assert not found.events.take_overflow()
    found.now += SETTLE
    found.discovery.take_events()
    assert "3.png" not in found.pending() and found.events.take_overflow()


def test_one_turn_takes_a_bounded_number_of_events(found: Found) -> None:
    for n in range(EVENTS_PER_TURN + 5):
        found.events.put(("modified", found.watch / f"gone-{n}.png"))  # vanished files: nothing to track
    found.discovery.take_events()
    assert found.events.qsize() == 5
    found.discovery.take_events()
    assert found.events.qsize() == 0


def test_a_take_rearms_the_wakeup_signal(found: Found) -> None:
    found.events.wake()
    fired = found.events.arrived()
    found.discovery.take_events()
    assert fired.done() and not found.events.arrived().done()


def test_a_rescan_event_starts_a_scan(found: Found) -> None:
    drop(found, "a.png")
    found.events.put(("rescan", found.watch))
    found.discovery.take_events()
    assert found.discovery.scanning and found.pending() == {}
    found.discovery.feed_scan()
    assert found.pending() == {"a.png": "scan"}
    assert found.discovered("scan") == 1


# --- scans --------------------------------------------------------------------------------------


def test_nothing_is_scanned_until_a_scan_starts(found: Found) -> None:
    drop(found, "a.png")
    assert not found.discovery.scanning and found.discovery.last_scan_done == 100.0
    found.discovery.feed_scan()
    assert found.pending() == {}


def test_a_scan_feeds_the_engine_only_while_it_has_room(found: Found) -> None:
    drop(found, *(f"{n}.png" for n in range(QUEUE_SIZE + 2)))
    found.discovery.start_scan("startup")
    found.now = 150.0
    found.discovery.feed_scan()
    assert found.pending() == {"0.png": "startup", "1.png": "startup", "2.png": "startup"}
    found.discovery.feed_scan()
    assert len(found.pending()) == QUEUE_SIZE and found.discovery.scanning
    assert found.discovery.last_scan_done == 100.0

    found.engine.pending.clear()  # dispatched
    found.now = 200.0
    found.discovery.feed_scan()
    assert found.pending() == {"3.png": "startup", "4.png": "startup"}
    assert not found.discovery.scanning and found.discovery.last_scan_done == 200.0
    assert found.discovered("startup") == QUEUE_SIZE + 2


def test_a_scan_of_an_empty_folder_ends_at_the_first_feed(found: Found) -> None:
    found.discovery.start_scan("scan")
    found.now = 130.0
    found.discovery.feed_scan()
    assert not found.discovery.scanning and found.discovery.last_scan_done == 130.0


def test_a_scan_asked_for_during_a_scan_runs_again_after_it(found: Found) -> None:
    drop(found, "b.png", "c.png", "d.png", "e.png")
    found.discovery.start_scan("startup")
    found.discovery.feed_scan()
    assert list(found.pending()) == ["b.png", "c.png", "d.png"]
    [missed] = drop(found, "a.png")  # behind the running scan: only a new scan can find it
    found.discovery.start_scan("scan")
    assert found.discovery.scan_source == "startup", "the running scan was restarted"

    found.engine.pending.clear()
    found.now = 120.0
    found.discovery.feed_scan()
    assert found.pending() == {"e.png": "startup"}
    assert found.discovery.scanning and found.discovery.last_scan_done == 120.0
    found.engine.pending.clear()
    found.discovery.feed_scan()
    assert found.pending() == {"a.png": "scan", "b.png": "scan", "c.png": "scan"}
    assert found.engine.pending["a.png"].path == missed


def test_files_already_queued_cost_no_room(found: Found) -> None:
    [path, *_] = drop(found, "a.png", "b.png", "c.png", "d.png")
    found.events.put(("closed", path))
    found.discovery.take_events()
    found.discovery.start_scan("scan")
    found.discovery.feed_scan()
    assert found.pending() == {"a.png": "event", "b.png": "scan", "c.png": "scan"}
