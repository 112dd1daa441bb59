"""`sinkwatch process`'s loop (`service.batch._done_before` and `_run`) on a ledger it shares with the daemon:
it takes on, waits for and counts only the files it was given, and counts the ones the ledger has done as
unchanged.

Real ledger and engine on tmp folders; every case here ends without a job, so no worker starts.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import pytest

from service.batch import _choose_rule, _done_before, _Keys, _run, expand
from service.engine import Candidate, Engine
from service.errors import ConfigError
from service.ledger import Ledger
from service.naming import disambiguated
from service.rules import load_rules
from service.settings import Settings
from tests.service.conftest import IdleEngine, file_stamp
from tests.service.test_publish import open_tmp, where_permissions_bind

__all__ = ["open_tmp"]  # the fixture, shared with test_publish

CONTENT = b"judged by size and mtime; a worker would refuse it, and none is started"
MAX_ATTEMPTS = 3


@pytest.fixture
def engine(watch: Path, idle_engine: IdleEngine) -> Engine:
    return idle_engine(resolve=lambda key: watch / key)


def recorded(engine: Engine, path: Path, state: str) -> Candidate:
    path.write_bytes(CONTENT)
    stamp = file_stamp(path)
    key = path.name
    engine.ledger.start(key, **stamp, sha256=None, rule="default", fingerprint="f")
    if state == "published":
        engine.ledger.published(key, **stamp, sha256="0" * 64, rule="default", fingerprint="f")
    elif state == "rejected":
        engine.ledger.rejected(key, reason="corrupt", message="")
    else:
        engine.ledger.retry(key, reason="incomplete", message="", next_attempt=0.0)  # due now
    return Candidate(key, path, "batch", 0.0)


def test_files_the_ledger_has_done_count_as_unchanged(engine: Engine, watch: Path) -> None:
    sources = [recorded(engine, watch / f"{state}.png", state) for state in ("published", "rejected")]

    done_before = _done_before(engine, sources)
    assert done_before == {"published.png", "rejected.png"}
    _run(engine, sources, done_before, MAX_ATTEMPTS)
    assert not engine.pending and not engine.in_flight
    assert engine.counts == {"published": 0, "rejected": 0, "retried": 0, "skipped": 0, "ignored": 0}


def test_the_daemons_due_retry_is_left_to_the_daemon(engine: Engine, watch: Path) -> None:
    recorded(engine, watch / "stuck.png", "retry")
    mine = recorded(engine, watch / "mine.png", "published")

    already = _done_before(engine, [mine])
    _run(engine, [mine], already, MAX_ATTEMPTS)

    stuck = engine.ledger.get("stuck.png")
    assert stuck is not None and (stuck.state, stuck.attempts) == ("retry", 1), "process retried the daemon's file"
    assert engine.counts == {"published": 0, "rejected": 0, "retried": 0, "skipped": 0, "ignored": 0}
    assert already == {"mine.png"}


def test_paths_given_to_process_that_cannot_be_taken_are_clear_errors(open_tmp: Path) -> None:
    (open_tmp / "private").mkdir()
    (open_tmp / "private" / "cat.png").write_bytes(b"\x89PNG")
    (open_tmp / "private").chmod(0o700)
    os.mkfifo(open_tmp / "pipe.png")

    def take(path: Path) -> list[tuple[Path, str]]:
        return list(expand([path], Settings(), queue=open_tmp / "queue"))

    for path, message in (
        (open_tmp / "missing.png", "no such file or folder"),
        (open_tmp / "private" / "cat.png", "cannot reach it: Permission denied"),
        (open_tmp / "pipe.png", "neither a file nor a folder"),
    ):
        with pytest.raises(ConfigError, match=message) as raised:
            where_permissions_bind(open_tmp, partial(take, path))
        assert raised.value.path == str(path)


def test_a_file_in_a_watch_folder_other_than_the_daemons_is_refused(tmp_path: Path) -> None:
    """Keys are paths in the daemon's folder: other/a.png keyed 'a.png' would take the name of daemons/a.png."""
    for folder in ("other", "daemons"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.png").write_bytes(CONTENT)
    daemons = f"{tmp_path / 'daemons'}{os.sep}"
    refused = _Keys(Settings(watch=tmp_path / "other"), daemons_root=daemons)

    with pytest.raises(ConfigError, match=r"is in --watch .*other, but the daemon on this queue watches .*daemons/"):
        refused.candidate(tmp_path / "other" / "a.png", "a.png")
    assert refused.candidate(tmp_path / "daemons" / "a.png", "a.png").key == "a.png"  # the daemon's own, keyed so
    (tmp_path / "link").symlink_to(tmp_path / "daemons")
    for watch in ("daemons", "link"):  # the daemon's folder, by its path or through a link
        keys = _Keys(Settings(watch=tmp_path / watch), daemons_root=daemons)
        assert keys.candidate(tmp_path / watch / "a.png", "a.png").key == "a.png"
    # No daemon on the queue yet; one in a container, its folder mounted here under another path.
    for recorded in (None, "/data/output/"):
        keys = _Keys(Settings(watch=tmp_path / "other"), daemons_root=recorded)
        assert keys.candidate(tmp_path / "other" / "a.png", "a.png").key == "a.png"


def test_a_link_and_its_target_outside_the_watch_folder_are_two_sources(tmp_path: Path) -> None:
    """As in the daemon, which keys a linked source by the link: one frame each, named after each."""
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "coffee.png").write_bytes(CONTENT)
    (tmp_path / "real" / "in_link.png").symlink_to("coffee.png")
    (tmp_path / "folder-link").symlink_to(tmp_path / "real")
    keys = _Keys(Settings(watch=tmp_path / "watch"), daemons_root=None)

    link = keys.candidate(tmp_path / "real" / "in_link.png", "in_link.png")
    target = keys.candidate(tmp_path / "real" / "coffee.png", "coffee.png")
    through = keys.candidate(tmp_path / "folder-link" / "coffee.png", "coffee.png")

    assert (link.key, target.key) == (str(tmp_path / "real" / "in_link.png"), str(tmp_path / "real" / "coffee.png"))
    assert through.key == target.key, "one file reached through a linked folder is one source"


@pytest.mark.parametrize(
    ("recorded_as", "keyed_as"),
    [
        ("in_link", "target"),  # made for the link by an earlier version
        ("disambiguated", "target"),
        ("disambiguated-2", "target"),
        ("coffee", "link"),  # made for the target itself
        ("in_link-01", "link"),  # made for a target named like that
        ("both", "link"),  # the link has a row of its own already
    ],
)
def test_a_link_recorded_under_its_targets_path_by_an_earlier_version_keeps_that_record(
    tmp_path: Path, recorded_as: str, keyed_as: str
) -> None:
    """Earlier versions keyed a link by its target's path and named its frame after the link: keyed anew, its
    image would be made again. A fresh link to a target recorded for itself is a source of its own."""
    (tmp_path / "real").mkdir()
    target, link = tmp_path / "real" / "coffee.png", tmp_path / "real" / "in_link.png"
    target.write_bytes(CONTENT)
    link.symlink_to("coffee.png")
    names = {
        "disambiguated": disambiguated("in_link", str(target)),
        "disambiguated-2": disambiguated("in_link", str(target), counter=2),
        "both": "coffee",
    }
    rows = {str(target): names.get(recorded_as, recorded_as)}
    if recorded_as == "both":
        rows[str(link)] = "in_link"
    with Ledger(tmp_path / "ledger.sqlite3") as ledger:
        for key, name in rows.items():
            ledger.start(key, **file_stamp(target), sha256=None, rule="default", fingerprint="f")
            # The name as the ledger hands it out: taken names are skipped until it comes.
            assert ledger.name_for(key, name, exists=lambda _name: False) == name
        keys = _Keys(Settings(watch=tmp_path / "watch"), daemons_root=None, recorded=ledger.get)

        found = keys.candidate(link, "in_link.png").key

    assert found == str(target if keyed_as == "target" else link)


def test_a_rule_named_like_a_folder_in_the_working_directory_is_the_rule_of_that_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run from the watch folder, whose gentle/ subfolder the preset `gentle` claims: `--rule gentle`."""
    (tmp_path / "gentle").mkdir()
    monkeypatch.chdir(tmp_path)
    assert _choose_rule("gentle", load_rules(None)).name == "gentle"
