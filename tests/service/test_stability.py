"""The stability tracker, driven by a fake clock: nothing here sleeps."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.stability import StabilityTracker
from tests.service.conftest import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def tracker(clock: FakeClock) -> StabilityTracker:
    return StabilityTracker(settle=2.0, clock=clock)


def settled(tracker: StabilityTracker) -> list[Path]:
    return [path for path, _held in tracker.ready()]


def grow(path: Path, data: bytes) -> None:
    with path.open("ab") as handle:
        handle.write(data)


def test_a_file_is_ready_once_it_held_still_for_the_settle_time(
    tmp_path: Path, tracker: StabilityTracker, clock: FakeClock
) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(b"complete")
    tracker.observe(path)
    assert settled(tracker) == []
    clock.advance(1.999)
    assert settled(tracker) == []
    clock.advance(0.001)
    assert settled(tracker) == [path]
    assert settled(tracker) == [], "returned once, then forgotten"
    assert tracker.pending() == 0


def test_a_growing_file_waits_until_it_stops(tmp_path: Path, tracker: StabilityTracker, clock: FakeClock) -> None:
    path = tmp_path / "slow.png"
    path.write_bytes(b"x")
    tracker.observe(path)
    for _chunk in range(5):
        clock.advance(1.5)
        grow(path, b"more")
        tracker.observe(path)  # the watcher's "modified" event
        assert settled(tracker) == []
    clock.advance(2.0)
    assert settled(tracker) == [path]


def test_a_change_seen_only_at_check_time_restarts_the_wait(
    tmp_path: Path, tracker: StabilityTracker, clock: FakeClock
) -> None:
    path = tmp_path / "quiet.png"
    path.write_bytes(b"first part")
    tracker.observe(path)
    grow(path, b" and the rest")  # no event for this write (polling observers miss some)
    clock.advance(2.0)
    assert settled(tracker) == [], "the size changed since it was observed"
    clock.advance(1.0)
    assert settled(tracker) == []
    clock.advance(1.0)
    assert settled(tracker) == [path]


def test_same_size_but_new_mtime_counts_as_a_change(
    tmp_path: Path, tracker: StabilityTracker, clock: FakeClock
) -> None:
    path = tmp_path / "rewritten.png"
    path.write_bytes(b"abcd")
    tracker.observe(path)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    clock.advance(2.0)
    assert settled(tracker) == []
    clock.advance(2.0)
    assert settled(tracker) == [path]


def test_observing_an_unchanged_file_again_does_not_restart_the_wait(
    tmp_path: Path, tracker: StabilityTracker, clock: FakeClock
) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(b"done")
    tracker.observe(path)
    clock.advance(1.5)
    tracker.observe(path)  # duplicate event
    clock.advance(0.5)
    assert settled(tracker) == [path]


def test_vanished_files_are_dropped(tmp_path: Path, tracker: StabilityTracker, clock: FakeClock) -> None:
    path = tmp_path / "gone.png"
    path.write_bytes(b"x")
    tracker.observe(path)
    path.unlink()
    clock.advance(5.0)
    assert settled(tracker) == []
    assert tracker.pending() == 0
    tracker.observe(tmp_path / "never-existed.png")
    assert tracker.pending() == 0


def test_a_file_replaced_by_a_folder_is_not_handed_on(
    tmp_path: Path, tracker: StabilityTracker, clock: FakeClock
) -> None:
    path = tmp_path / "odd.png"
    path.write_bytes(b"x")
    tracker.observe(path)
    path.unlink()
    path.mkdir()
    clock.advance(5.0)
    assert settled(tracker) == []
    assert tracker.pending() == 0


def test_forget_and_pending(tmp_path: Path, tracker: StabilityTracker, clock: FakeClock) -> None:
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for path in paths:
        path.write_bytes(b"x")
        tracker.observe(path)
    assert tracker.pending() == 3
    tracker.forget(paths[1])  # the "closed" fast path took it
    tracker.forget(tmp_path / "unknown.png")
    assert tracker.pending() == 2
    clock.advance(2.0)
    assert settled(tracker) == [paths[0], paths[2]]


def test_files_settle_independently(tmp_path: Path, tracker: StabilityTracker, clock: FakeClock) -> None:
    early, late = tmp_path / "early.png", tmp_path / "late.png"
    early.write_bytes(b"e")
    tracker.observe(early)
    clock.advance(1.0)
    late.write_bytes(b"l")
    tracker.observe(late)
    clock.advance(1.0)
    assert settled(tracker) == [early]
    clock.advance(1.0)
    assert settled(tracker) == [late]


def test_zero_settle_hands_on_at_the_next_check(tmp_path: Path, clock: FakeClock) -> None:
    tracker = StabilityTracker(settle=0.0, clock=clock)
    path = tmp_path / "a.png"
    path.write_bytes(b"x")
    tracker.observe(path)
    assert settled(tracker) == [path]


def test_negative_settle_is_refused() -> None:
    with pytest.raises(ValueError, match="settle"):
        StabilityTracker(settle=-1.0)


# -- how long a settled file has held still: where its publish latency starts -------------------------


def test_a_moved_in_file_has_held_still_since_its_event(
    tmp_path: Path, tracker: StabilityTracker, clock: FakeClock
) -> None:
    path = tmp_path / "moved.png"
    path.write_bytes(b"complete already")
    tracker.observe(path)  # the "moved" event
    clock.advance(3.5)  # the loop looked late
    assert tracker.ready() == [(path, 3.5)]


def test_a_growing_file_has_held_still_since_its_last_change(
    tmp_path: Path, tracker: StabilityTracker, clock: FakeClock
) -> None:
    path = tmp_path / "slow.png"
    path.write_bytes(b"start")
    tracker.observe(path)
    clock.advance(1.0)
    grow(path, b"end")
    tracker.observe(path)  # "modified": the close is about now
    clock.advance(2.25)
    assert tracker.ready() == [(path, 2.25)]


def test_a_change_found_only_at_check_time_counts_from_that_check(
    tmp_path: Path, tracker: StabilityTracker, clock: FakeClock
) -> None:
    path = tmp_path / "quiet.png"
    path.write_bytes(b"first part")
    tracker.observe(path)
    grow(path, b" and the rest")  # no event: the change is known only when the check finds it
    clock.advance(2.0)
    assert tracker.ready() == []
    clock.advance(2.0)
    assert tracker.ready() == [(path, 2.0)]
