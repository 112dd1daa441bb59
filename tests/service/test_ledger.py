"""The ledger: states, names, durability, and consistency after kill -9."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.errors import ConfigError, PublishError
from service.ledger import MIGRATIONS, SCHEMA_VERSION, STATES, Ledger, Stamp
from service.ledger_stamps import KEYS_PER_QUERY
from service.naming import disambiguated, safe_stem
from tests.service.conftest import FakeClock

REPO = Path(__file__).resolve().parents[2]
SHA = "0" * 64


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.0)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "ledger.sqlite3"


@pytest.fixture
def ledger(db_path: Path, clock: FakeClock) -> Iterator[Ledger]:
    db_path.parent.mkdir()
    with Ledger(db_path, clock=clock) as opened:
        yield opened


def never(_name: str) -> bool:
    return False


def start(ledger: Ledger, relpath: str, *, size: int = 10, mtime_ns: int = 20, ino: int = 30) -> None:
    ledger.start(
        relpath, size=size, mtime_ns=mtime_ns, ino=ino, ctime_ns=40, sha256=None, rule="default", fingerprint="f1"
    )


def publish(ledger: Ledger, relpath: str, *, size: int = 10, mtime_ns: int = 20) -> None:
    ledger.published(
        relpath, size=size, mtime_ns=mtime_ns, ino=30, ctime_ns=40, sha256=SHA, rule="default", fingerprint="f1"
    )


# -- set-up -------------------------------------------------------------------


def test_a_new_ledger_is_versioned_wal_and_fully_synchronous(ledger: Ledger, db_path: Path) -> None:
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert ledger._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL, on the ledger's own connection


def old_ledger(db_path: Path, version: int) -> None:
    """A ledger file at schema `version` holding one published source, "old.png"."""
    db_path.parent.mkdir()
    with sqlite3.connect(db_path) as raw:
        for step in range(1, version + 1):
            for statement in MIGRATIONS[step]:
                raw.execute(statement)
        raw.execute(
            "INSERT INTO sources (relpath, state, size, mtime_ns, sha256, attempts, updated)"
            " VALUES (?, 'published', 10, 20, ?, 1, 1.0)",
            (b"old.png", SHA),
        )
        raw.execute(f"PRAGMA user_version = {version}")


@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION))
def test_a_ledger_of_every_earlier_schema_opens_and_answers_every_query(db_path: Path, version: int) -> None:
    """Version 6 among them, as 8604538 wrote it: the birth-time column, first added to migration 6 after that
    had shipped, was then missing from such ledgers, no migration ran, and every query failed."""
    old_ledger(db_path, version)
    with Ledger(db_path) as ledger:
        entry = ledger.get("old.png")
        assert entry is not None and (entry.state, entry.sha256, entry.gone, entry.born) == (
            "published",
            SHA,
            None,
            None,
        )
        assert [e.relpath for e in ledger.entries()] == ["old.png"] and ledger.due(0.0) == []
        ledger.mark_gone(["old.png"])
        assert ledger.name_for("old.png", "old", exists=lambda _name: False) == "old"
        publish(ledger, "new.png")
        assert ledger.stamps(["new.png"]) == {"new.png": Stamp("published", 10, 20, 30, 40)}


def test_a_version_2_ledger_is_migrated_and_its_rows_have_an_unknown_inode_and_ctime(db_path: Path) -> None:
    old_ledger(db_path, 2)
    with Ledger(db_path) as ledger:
        assert ledger.stamps(["old.png"]) == {"old.png": Stamp("published", 10, 20, None, None)}
        publish(ledger, "new.png")
        assert ledger.stamps(["new.png"]) == {"new.png": Stamp("published", 10, 20, 30, 40)}
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 9
        # Not seen by a scan yet: forgotten only once gone for --forget-after-days after its last update.
        assert raw.execute("SELECT seen FROM sources WHERE relpath = ?", (b"old.png",)).fetchone() == (None,)


def test_a_ledger_from_a_newer_sinkwatch_is_refused(db_path: Path) -> None:
    db_path.parent.mkdir()
    Ledger(db_path).close()
    with sqlite3.connect(db_path) as raw:
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(ConfigError, match="newer"):
        Ledger(db_path)


def test_a_file_that_is_not_a_database_is_a_config_error(db_path: Path) -> None:
    db_path.parent.mkdir()
    db_path.write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(ConfigError, match="ledger") as raised:
        Ledger(db_path)
    assert raised.value.path == str(db_path)


def test_a_missing_state_folder_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot open the ledger"):
        Ledger(tmp_path / "absent" / "ledger.sqlite3")


def test_reopening_keeps_everything(db_path: Path, clock: FakeClock) -> None:
    db_path.parent.mkdir()
    with Ledger(db_path, clock=clock) as first:
        name = first.name_for("a.png", "a", exists=never)
        start(first, "a.png")
        publish(first, "a.png")
        before = first.get("a.png")
    with Ledger(db_path, clock=clock) as second:
        assert second.get("a.png") == before
        assert second.name_for("a.png", "other", exists=never) == name


# -- states -------------------------------------------------------------------


def test_a_source_through_retry_to_published(ledger: Ledger, clock: FakeClock) -> None:
    assert ledger.get("a.png") is None
    start(ledger, "a.png")
    entry = ledger.get("a.png")
    assert entry is not None
    assert (entry.state, entry.attempts, entry.size, entry.mtime_ns, entry.updated) == (
        "processing",
        1,
        10,
        20,
        clock.now,
    )
    ledger.retry("a.png", reason="incomplete", message="truncated", next_attempt=clock.now + 2)
    entry = ledger.get("a.png")
    assert entry is not None
    assert (entry.state, entry.attempts, entry.reason, entry.next_attempt) == ("retry", 1, "incomplete", clock.now + 2)
    clock.now += 5
    start(ledger, "a.png")
    entry = ledger.get("a.png")
    assert entry is not None
    assert (entry.state, entry.attempts, entry.reason) == ("processing", 2, "incomplete"), "last failure kept"
    publish(ledger, "a.png")
    entry = ledger.get("a.png")
    assert entry is not None
    assert (entry.state, entry.attempts, entry.sha256, entry.rule, entry.fingerprint) == (
        "published",
        2,
        SHA,
        "default",
        "f1",
    )
    assert (entry.reason, entry.message, entry.next_attempt, entry.updated) == (None, None, None, clock.now)


def test_new_content_after_a_final_state_counts_attempts_afresh(ledger: Ledger) -> None:
    for _ in range(3):
        start(ledger, "a.png")
    publish(ledger, "a.png")
    start(ledger, "a.png", size=99)
    entry = ledger.get("a.png")
    assert entry is not None
    assert (entry.attempts, entry.size) == (1, 99)


def test_another_file_of_the_same_size_and_mtime_counts_attempts_afresh(ledger: Ledger) -> None:
    for _ in range(2):
        start(ledger, "a.png")
    start(ledger, "a.png", ino=31)  # replaced, rsync -t style
    entry = ledger.get("a.png")
    assert entry is not None and entry.attempts == 1


def test_a_retry_row_from_before_inodes_goes_on_counting_its_attempts(db_path: Path) -> None:
    # Upgraded from a version 2 ledger: the retry row knows size and mtime only.
    old_ledger(db_path, 2)
    with sqlite3.connect(db_path) as raw:
        raw.execute(
            "INSERT INTO sources (relpath, state, size, mtime_ns, attempts, next_attempt, updated)"
            " VALUES (?, 'retry', 10, 20, 2, 5.0, 1.0)",
            (b"trunc.png",),
        )
    with Ledger(db_path) as ledger:
        start(ledger, "trunc.png")
        entry = ledger.get("trunc.png")
        assert entry is not None and entry.attempts == 3
        start(ledger, "trunc.png", ino=31)
        entry = ledger.get("trunc.png")
        assert entry is not None and entry.attempts == 1, "once known, another inode is another file"


def test_rejected_keeps_what_start_recorded_unless_told(ledger: Ledger) -> None:
    start(ledger, "a.png", size=10, mtime_ns=20)
    ledger.rejected("a.png", reason="bomb", message="too many pixels")
    entry = ledger.get("a.png")
    assert entry is not None
    assert (entry.state, entry.size, entry.mtime_ns, entry.reason, entry.message) == (
        "rejected",
        10,
        20,
        "bomb",
        "too many pixels",
    )
    assert ledger.stamps(["a.png"])["a.png"] == Stamp("rejected", 10, 20, 30, 40)
    ledger.rejected("a.png", reason="corrupt", message="bad", size=11, mtime_ns=21, ino=31, ctime_ns=41, sha256=SHA)
    entry = ledger.get("a.png")
    assert entry is not None
    assert (entry.size, entry.mtime_ns, entry.sha256, entry.reason) == (11, 21, SHA, "corrupt")
    assert ledger.stamps(["a.png"])["a.png"] == Stamp("rejected", 11, 21, 31, 41)


def test_methods_work_without_a_prior_start(ledger: Ledger) -> None:
    ledger.rejected("r.png", reason="empty", message="zero bytes")
    ledger.retry("t.png", reason="publish", message="disk full", next_attempt=5.0)
    publish(ledger, "p.png")
    assert ledger.counts() == {"processing": 0, "published": 1, "rejected": 1, "retry": 1}


def test_stamps_give_state_and_file_stamp_of_the_known_sources_only(ledger: Ledger) -> None:
    publish(ledger, "p.png", size=1, mtime_ns=2)
    ledger.rejected("r.png", reason="bomb", message="x", size=3, mtime_ns=4, ino=7, ctime_ns=8)
    start(ledger, "s.png", size=5, mtime_ns=6)
    ledger.retry("t.png", reason="incomplete", message="", next_attempt=5.0)
    stamps = ledger.stamps(["p.png", "r.png", "s.png", "t.png", "unknown.png", "P.PNG"])
    assert stamps == {
        "p.png": Stamp("published", 1, 2, 30, 40),
        "r.png": Stamp("rejected", 3, 4, 7, 8),
        "s.png": Stamp("processing", 5, 6, 30, 40),
        "t.png": Stamp("retry", None, None, None, None),
    }
    assert ledger.stamps([]) == {}


def test_stamps_agree_with_get_for_more_keys_than_one_query_takes(ledger: Ledger) -> None:
    keys = [f"{n:04d}.png" for n in range(KEYS_PER_QUERY * 2 + 3)]
    for n, key in enumerate(keys[::2]):
        publish(ledger, key, size=n, mtime_ns=n * 10)
    odd = "caf\udce9/\udcff.png"  # an undecodable name, as os.scandir gives it
    start(ledger, odd)
    stamps = ledger.stamps([*keys, odd])
    assert set(stamps) == {*keys[::2], odd}
    for key, stamp in stamps.items():
        entry = ledger.get(key)
        assert entry is not None and stamp[:3] == (entry.state, entry.size, entry.mtime_ns), key


def test_due_lists_retries_whose_time_has_come_oldest_first(ledger: Ledger) -> None:
    ledger.retry("late.png", reason="incomplete", message="", next_attempt=30.0)
    ledger.retry("b.png", reason="incomplete", message="", next_attempt=10.0)
    ledger.retry("a.png", reason="incomplete", message="", next_attempt=10.0)
    ledger.retry("first.png", reason="publish", message="", next_attempt=5.0)
    start(ledger, "busy.png")
    assert [e.relpath for e in ledger.due(4.9)] == []
    assert [e.relpath for e in ledger.due(10.0)] == ["first.png", "a.png", "b.png"]
    assert [e.relpath for e in ledger.due(100.0)] == ["first.png", "a.png", "b.png", "late.png"]


def test_entries_and_counts(ledger: Ledger) -> None:
    start(ledger, "c.png")
    publish(ledger, "b.png")
    publish(ledger, "a.png")
    assert [e.relpath for e in ledger.entries()] == ["a.png", "b.png", "c.png"]
    assert [e.relpath for e in ledger.entries("published")] == ["a.png", "b.png"]
    assert ledger.entries("rejected") == []
    assert ledger.counts() == {"processing": 1, "published": 2, "rejected": 0, "retry": 0}
    with pytest.raises(ValueError, match="state"):
        ledger.entries("done")


def test_forget_drops_the_entry_but_keeps_the_name(ledger: Ledger) -> None:
    name = ledger.name_for("a.png", "a", exists=never)
    start(ledger, "a.png")
    ledger.forget("a.png")
    assert ledger.get("a.png") is None
    assert ledger.name_for("b/a.png", "a", exists=never) != name, "the name stays reserved"
    assert ledger.name_for("a.png", "a", exists=lambda _n: True) == name


def test_undecodable_file_names_round_trip(ledger: Ledger) -> None:
    relpath = "caf\udce9/\udcff.png"  # what os.scandir gives for Latin-1 bytes on a UTF-8 system
    name = ledger.name_for(relpath, safe_stem(relpath), exists=never)
    start(ledger, relpath)
    ledger.rejected(relpath, reason="corrupt", message=f"cannot read {relpath}")
    entry = ledger.get(relpath)
    assert entry is not None
    assert entry.relpath == relpath
    assert entry.output_name == name
    assert entry.message == "cannot read caf\\udce9/\\udcff.png"
    assert [e.relpath for e in ledger.entries()] == [relpath]


# -- names --------------------------------------------------------------------


def test_a_name_is_stable_per_source(ledger: Ledger) -> None:
    first = ledger.name_for("sub/cat.png", "sub__cat", exists=never)
    assert first == "sub__cat"
    assert ledger.name_for("sub/cat.png", "sub__cat", exists=lambda _n: True) == first
    start(ledger, "sub/cat.png")
    entry = ledger.get("sub/cat.png")
    assert entry is not None and entry.output_name == first


def test_another_source_with_the_same_stem_gets_a_disambiguated_name(ledger: Ledger) -> None:
    assert ledger.name_for("a/b.png", "a__b", exists=never) == "a__b"
    assert ledger.name_for("a__b.png", "a__b", exists=never) == disambiguated("a__b", "a__b.png")


def test_names_are_compared_case_insensitively(ledger: Ledger) -> None:
    assert ledger.name_for("Cat.png", "Cat", exists=never) == "Cat"
    assert ledger.name_for("cat.jpg", "cat", exists=never) == disambiguated("cat", "cat.jpg")
    assert ledger.name_for("STRASSE.png", "STRASSE", exists=never) == "STRASSE"
    assert ledger.name_for("straße.png", "straße", exists=never) == disambiguated("straße", "straße.png")


def test_a_foreign_file_in_the_queue_is_never_taken_over(ledger: Ledger) -> None:
    foreign = {"cat"}
    assert ledger.name_for("cat.png", "cat", exists=foreign.__contains__) == disambiguated("cat", "cat.png")


def test_a_name_lost_to_someone_elses_file_is_replaced_and_never_given_again(ledger: Ledger) -> None:
    assert ledger.name_for("cat.png", "cat", exists=never) == "cat"
    new = ledger.name_for("cat.png", "cat", exists=never, instead_of="cat")
    assert new == disambiguated("cat", "cat.png")
    assert ledger.name_for("cat.png", "cat", exists=never) == new
    # Lost again, and the user's file still sits at "cat": the next candidate.
    again = ledger.name_for("cat.png", "cat", exists={"cat"}.__contains__, instead_of=new)
    assert again == disambiguated("cat", "cat.png", counter=2)
    # Naming a name it does not have changes nothing.
    assert ledger.name_for("cat.png", "cat", exists=never, instead_of="dog") == again


def test_the_frame_hash_is_kept_until_a_new_frame_is_published(ledger: Ledger) -> None:
    stamp = {"size": 10, "mtime_ns": 20, "ino": 30, "ctime_ns": 40, "rule": "default", "fingerprint": "f1"}
    ledger.name_for("cat.png", "cat", exists=never)
    ledger.published("cat.png", sha256=SHA, frame_sha256="1" * 64, **stamp)  # type: ignore[arg-type]
    # Unchanged content touched: nothing was written, the frame on disk is still the recorded one.
    ledger.published("cat.png", sha256=SHA, **stamp | {"mtime_ns": 21})  # type: ignore[arg-type]
    entry = ledger.get("cat.png")
    assert entry is not None and entry.frame_sha256 == "1" * 64
    ledger.published("cat.png", sha256=SHA, frame_sha256="2" * 64, **stamp)  # type: ignore[arg-type]
    entry = ledger.get("cat.png")
    assert entry is not None and entry.frame_sha256 == "2" * 64


def test_a_version_3_ledger_gains_an_unknown_frame_hash(db_path: Path) -> None:
    old_ledger(db_path, 3)
    with Ledger(db_path) as ledger:
        entry = ledger.get("old.png")
        assert entry is not None and entry.state == "published" and entry.frame_sha256 is None


def test_when_even_the_disambiguated_name_is_taken_a_counter_is_added(ledger: Ledger) -> None:
    taken = {"cat", disambiguated("cat", "cat.png"), disambiguated("cat", "cat.png", counter=2)}
    name = ledger.name_for("cat.png", "cat", exists=taken.__contains__)
    assert name == disambiguated("cat", "cat.png", counter=3)


def test_the_name_table_refuses_duplicates_whatever_the_caller_does(ledger: Ledger, db_path: Path) -> None:
    ledger.name_for("a.png", "same", exists=never)
    with sqlite3.connect(db_path) as raw, pytest.raises(sqlite3.IntegrityError):
        raw.execute("INSERT INTO names (relpath, name, folded) VALUES (?, 'SAME', 'same')", (b"b.png",))


# -- failures -----------------------------------------------------------------


def test_a_full_disk_is_a_transient_error_and_rolls_back(ledger: Ledger, db_path: Path) -> None:
    """Real SQLITE_FULL: the ledger's connection may not grow the database past a page limit."""
    publish(ledger, "kept.png")
    pages = ledger._db.execute("PRAGMA page_count").fetchone()[0]
    ledger._db.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(PublishError, match="full") as raised:
        for i in range(10_000):
            ledger.name_for(f"{i:05d}-{'x' * 200}.png", f"{i:05d}-{'x' * 100}", exists=never)
    assert raised.value.transient and raised.value.stage == "ledger"
    assert raised.value.path == str(db_path)
    ledger._db.execute("PRAGMA max_page_count = 1073741823")
    publish(ledger, "after.png")
    assert ledger.counts()["published"] == 2
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_an_exception_inside_name_for_rolls_back(ledger: Ledger) -> None:
    def broken(_name: str) -> bool:
        raise OSError("stat failed")

    with pytest.raises(OSError, match="stat failed"):
        ledger.name_for("a.png", "a", exists=broken)
    assert ledger.name_for("b.png", "a", exists=never) == "a", "nothing was reserved by the failed call"


# -- kill -9 ------------------------------------------------------------------

# One ledger call per step, fully determined by the step number, so the test can
# replay which state every source must be in after the child dies.
CHILD = r"""
import sys
from pathlib import Path
from service.ledger import Ledger
from service.naming import safe_stem
from tests.service.test_ledger import step_call

ledger = Ledger(Path(sys.argv[1]))
step = int(sys.argv[2])
while True:
    print(f"B {step}", flush=True)
    result = step_call(ledger, step)
    print(f"C {step} {result}", flush=True)
    step += 1
"""


def step_source(step: int) -> str:
    group = (step // 3) % 24
    # Odd groups sanitise to the stem of the even group before them: names must be disambiguated.
    return f"dir/img-{group}.png" if group % 2 == 0 else f"dir__img-{group - 1}.png"


def step_state(step: int) -> str | None:
    """The state a step leaves its source in (None: the step does not change it)."""
    phase, outcome = step % 3, (step // 3) % 4
    if phase == 0:
        return None
    if phase == 1:
        return "processing"
    return ("published", "retry", "rejected", "published")[outcome]


def step_call(ledger: Ledger, step: int) -> str:
    relpath, phase = step_source(step), step % 3
    if phase == 0:
        return ledger.name_for(relpath, safe_stem(relpath), exists=never)
    if phase == 1:
        ledger.start(relpath, size=step, mtime_ns=step, sha256=None, rule="default", fingerprint="f")
    elif step_state(step) == "published":
        ledger.published(relpath, size=step, mtime_ns=step, sha256=SHA, rule="default", fingerprint="f")
    elif step_state(step) == "retry":
        ledger.retry(relpath, reason="incomplete", message=f"step {step}", next_attempt=float(step))
    else:
        ledger.rejected(relpath, reason="corrupt", message=f"step {step}")
    return "-"


def run_until_killed(db_path: Path, first_step: int, commits: int) -> tuple[int, int | None, dict[str, str]]:
    """Run the writer child until it confirmed `commits` steps, SIGKILL it; returns
    (last confirmed step, step begun but unconfirmed, names it confirmed)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db_path), str(first_step)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO,
    )
    assert proc.stdout is not None and proc.stderr is not None
    confirmed, begun, names = first_step - 1, None, {}

    def take(line: str) -> None:
        nonlocal confirmed, begun
        kind, step, *rest = line.split()
        if kind == "B":
            begun = int(step)
        else:
            confirmed, begun = int(step), None
            if rest[0] != "-":
                names[step_source(confirmed)] = rest[0]

    try:
        while confirmed < first_step + commits - 1:
            line = proc.stdout.readline().decode()
            if not line:
                pytest.fail(f"writer died on its own: {proc.stderr.read().decode()}")
            take(line)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # On a busy machine the child runs steps ahead of this reader: what it printed before the kill (whole
        # lines: a write that small to a pipe is atomic) is still in the pipe, and says where it was.
        for line in proc.stdout.read().decode().splitlines():
            take(line)
        proc.stdout.close()
        proc.stderr.close()
    # The child may have begun (and even committed) the next step before the kill.
    return confirmed, confirmed + 1 if begun is None else begun, names


def expected_states(last_step: int) -> dict[str, str]:
    states: dict[str, str] = {}
    for step in range(last_step + 1):
        state = step_state(step)
        if state is not None:
            states[step_source(step)] = state
    return states


def test_kill_9_at_random_points_leaves_a_consistent_ledger(db_path: Path) -> None:
    db_path.parent.mkdir()
    rng = random.Random(8)
    names: dict[str, str] = {}
    step = 0
    for _kill in range(8):
        confirmed, unconfirmed, confirmed_names = run_until_killed(db_path, step, rng.randint(5, 150))
        names.update(confirmed_names)

        with sqlite3.connect(db_path) as raw:
            assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            folded = [row[0] for row in raw.execute("SELECT folded FROM names")]
            assert len(folded) == len(set(folded))
            assert {row[0] for row in raw.execute("SELECT DISTINCT state FROM sources")} <= set(STATES)

        with Ledger(db_path) as ledger:
            actual = {entry.relpath: entry.state for entry in ledger.entries()}
            before, after = expected_states(confirmed), expected_states(unconfirmed or confirmed)
            for relpath in before.keys() | after.keys():
                assert actual.get(relpath) in {before.get(relpath), after.get(relpath)}, relpath
            for relpath, name in names.items():
                assert ledger.name_for(relpath, "unused", exists=never) == name, "a name survives every crash"
            for entry in ledger.entries("published"):
                assert entry.sha256 == SHA and entry.output_name is not None
        step = confirmed + 1
    assert len(set(names.values())) == len(names) == 24, "every source got its own name"


# -- the state folder deleted under an open ledger ------------------------------------------------


def test_a_ledger_whose_folder_was_deleted_is_written_back_and_a_failed_write_back_keeps_the_open_one(
    ledger: Ledger, db_path: Path
) -> None:
    publish(ledger, "kept.png")
    assert not ledger.moved()
    subprocess.run(["rm", "-rf", str(db_path.parent)], check=True)
    assert ledger.moved()

    db_path.parent.write_text("a file where the state folder was")  # the folder cannot come back yet
    with pytest.raises(PublishError, match="cannot write the ledger back"):
        ledger.rewrite()
    assert ledger.moved() and ledger.get("kept.png") is not None, "a failed write-back must keep the open ledger"

    db_path.parent.unlink()
    ledger.rewrite()
    assert not ledger.moved()
    publish(ledger, "after.png")
    with Ledger(db_path) as reopened:
        assert {e.relpath for e in reopened.entries("published")} == {"kept.png", "after.png"}


def test_without_a_recorded_name_a_frame_already_the_sources_own_goes_first(ledger: Ledger) -> None:
    # A lost ledger: CAT.png's frame is CAT-<hash>.png in the queue; "CAT" itself is free.
    theirs = disambiguated("CAT", "CAT.png")
    assert ledger.name_for("CAT.png", "CAT", exists=never, own=lambda n: n == theirs) == theirs
    assert ledger.name_for("Cat.png", "Cat", exists=never, own=lambda n: n == "Cat") == "Cat"
    assert ledger.name_for("dog.png", "dog", exists=never, own=never) == "dog"
    # Recorded, the name stands; lost to someone else's file, it is never taken again, owned or not.
    assert ledger.name_for("CAT.png", "CAT", exists=never, own=lambda _n: True) == theirs
    lost = ledger.name_for("CAT.png", "CAT", exists=never, instead_of=theirs, own=lambda _n: True)
    assert lost not in (theirs, "Cat") and lost.casefold() != "cat"
