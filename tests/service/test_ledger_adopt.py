"""Ledger.adopt: the rows `sinkwatch process` keyed by absolute path become the daemon's, keyed relative to its folder.

Real SQLite ledger; the absolute keys are what `service.batch` makes (``str(path.resolve())``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from service.ledger import Entry, Ledger

SHA = "a" * 64


def never(_name: str) -> bool:
    return False


def processed(ledger: Ledger, key: str, stem: str, *, sha256: str = SHA) -> str:
    """A source published under `key`, as the engine and outcomes record it; returns its output name."""
    name = ledger.name_for(key, stem, exists=never)
    ledger.start(key, size=10, mtime_ns=20, ino=30, ctime_ns=40, sha256=None, rule="default", fingerprint="f")
    ledger.published(key, size=10, mtime_ns=20, ino=30, ctime_ns=40, sha256=sha256, rule="default", fingerprint="f")
    return name


def entry(ledger: Ledger, key: str) -> Entry:
    found = ledger.get(key)
    assert found is not None, key
    return found


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "output"
    (folder / "sub").mkdir(parents=True)
    return folder


def test_rows_under_the_watch_folder_are_rekeyed_with_everything_they_hold(ledger: Ledger, root: Path) -> None:
    top = processed(ledger, str(root / "astronaut.png"), "astronaut")
    nested = processed(ledger, str(root / "sub" / "coffee.png"), "coffee")
    ledger.start(str(root / "waiting.png"), size=1, mtime_ns=2, sha256=None, rule="default", fingerprint="f")
    ledger.retry(str(root / "waiting.png"), reason="incomplete", message="short", next_attempt=99.0)
    before = entry(ledger, str(root / "astronaut.png"))
    stamps = ledger.stamps([str(root / "astronaut.png")])

    assert ledger.adopt(root) == 3

    after = entry(ledger, "astronaut.png")
    assert after == Entry(**{**vars(before), "relpath": "astronaut.png"})
    assert ledger.stamps(["astronaut.png"]) == {"astronaut.png": stamps[str(root / "astronaut.png")]}
    assert entry(ledger, "sub/coffee.png").output_name == nested
    waiting = entry(ledger, "waiting.png")
    assert (waiting.state, waiting.next_attempt, waiting.message) == ("retry", 99.0, "short")
    assert [e.relpath for e in ledger.entries()] == ["astronaut.png", "sub/coffee.png", "waiting.png"]
    assert ledger.name_for("astronaut.png", "astronaut", exists=never) == top, "the daemon reuses the name"
    assert ledger.adopt(root) == 0, "nothing is left to adopt"


def test_rows_outside_the_watch_folder_are_left_alone(ledger: Ledger, root: Path, tmp_path: Path) -> None:
    beside = str(tmp_path / "output-2" / "a.png")  # the watch folder's path is a prefix of its text, not of its path
    elsewhere = str(tmp_path / "a.png")
    for key in (beside, elsewhere, "a.png"):
        processed(ledger, key, "a")
    before = ledger.entries()
    assert ledger.adopt(root) == 0
    assert ledger.entries() == before


def test_the_daemons_own_row_wins_and_the_absolute_one_is_dropped(ledger: Ledger, root: Path) -> None:
    own = processed(ledger, "a.png", "a", sha256="b" * 64)
    processed(ledger, str(root / "a.png"), "a", sha256=SHA)
    before = entry(ledger, "a.png")

    assert ledger.adopt(root) == 1

    assert ledger.entries() == [before]
    assert before.output_name == own


def test_a_row_made_where_the_daemon_only_reserved_a_name_brings_its_own_name(ledger: Ledger, root: Path) -> None:
    ledger.name_for("a.png", "a", exists=never)  # the daemon saw the file once; it vanished and was forgotten
    made = processed(ledger, str(root / "a.png"), "a")
    assert made != "a"
    ledger.adopt(root)
    assert entry(ledger, "a.png").output_name == made, "the name of the frame that row's sidecar describes"


def test_a_name_reserved_by_a_batch_for_a_forgotten_file_moves_unless_the_daemon_has_one(
    ledger: Ledger, root: Path
) -> None:
    reserved = ledger.name_for(str(root / "gone.png"), "gone", exists=never)
    ledger.name_for(str(root / "both.png"), "both", exists=never)
    daemons = ledger.name_for("both.png", "both", exists=never)
    assert ledger.adopt(root) == 2
    assert ledger.name_for("gone.png", "anything", exists=never) == reserved
    assert ledger.name_for("both.png", "anything", exists=never) == daemons


def test_a_watch_folder_given_through_a_symlink_adopts_the_resolved_keys(
    ledger: Ledger, root: Path, tmp_path: Path
) -> None:
    link = tmp_path / "link"
    link.symlink_to(root)
    processed(ledger, str(root / "a.png"), "a")
    assert ledger.adopt(link) == 1
    assert entry(ledger, "a.png").state == "published"


def test_undecodable_file_names_are_adopted_exactly(ledger: Ledger, root: Path) -> None:
    odd = "caf\udce9/\udcff.png"  # as os.scandir gives names that are not UTF-8
    name = processed(ledger, f"{root}/{odd}", "cafe")
    assert ledger.adopt(root) == 1
    assert entry(ledger, odd).output_name == name


def test_uploads_owed_for_an_adopted_row_name_the_new_key(ledger: Ledger, root: Path) -> None:
    name = processed(ledger, str(root / "a.png"), "a")
    ledger.upload_pending(name, relpath=str(root / "a.png"), width=8, height=8)
    ledger.adopt(root)
    assert [(u.name, u.relpath) for u in ledger.pending_uploads(limit=10)] == [(name, "a.png")]
