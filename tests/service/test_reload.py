"""service.reload: rule files checked once a second or on request, a broken folder keeps the last good rules.

Real rule folders in tmp_path, real metrics; time is the `now` each poll is given.
"""

from __future__ import annotations

import os
import resource
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from loguru import logger
from prometheus_client import CollectorRegistry

import service.reload
from service import __version__
from service.errors import RuleError
from service.metrics import OUTCOMES, Metrics
from service.reload import CHECK_INTERVAL, RuleReloader, record_rules
from service.rules import RuleSet, load_rules

DEFAULT = 'name = "default"\n'
BROKEN = 'name = "default"\n[resize]\nwidth = 831\n'  # not a multiple of 16


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "default.toml").write_text(DEFAULT, encoding="utf-8")
    return rules


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
def reloader(folder: Path, metrics: Metrics) -> RuleReloader:
    """Started like the daemon starts it: first load, its rules shown in the metrics, a first poll at 0."""
    reloader = RuleReloader(folder)
    record_rules(metrics, reloader.load())
    assert reloader.poll(0.0, metrics=metrics) is None
    return reloader


@pytest.fixture
def errors() -> Iterator[list[dict[str, Any]]]:
    records: list[dict[str, Any]] = []
    sink = logger.add(lambda message: records.append(dict(message.record)), level="ERROR")
    yield records
    logger.remove(sink)


def failures(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("sinkwatch_rule_reload_failures_total")


def fingerprint_shown(metrics: Metrics) -> str:
    """The rules fingerprint `sinkwatch_build_info` carries (exactly one series)."""
    [sample] = [s for f in metrics.registry.collect() if f.name == "sinkwatch_build" for s in f.samples]
    assert sample.labels["version"] == __version__
    return sample.labels["rules_fingerprint"]


def test_the_first_load_reads_the_folder_and_a_broken_one_is_a_config_error(folder: Path) -> None:
    assert RuleReloader(folder).load().names == ("default",)
    (folder / "default.toml").write_text(BROKEN, encoding="utf-8")
    with pytest.raises(RuleError) as caught:
        RuleReloader(folder).load()
    assert caught.value.field == "resize.width"


def test_an_unchanged_folder_is_never_reloaded(reloader: RuleReloader, metrics: Metrics) -> None:
    assert [reloader.poll(float(now), metrics=metrics) for now in range(1, 6)] == [None] * 5


def test_an_edit_is_seen_at_the_next_check_not_before(reloader: RuleReloader, folder: Path, metrics: Metrics) -> None:
    (folder / "default.toml").write_text(DEFAULT + 'description = "edited"\n', encoding="utf-8")
    assert reloader.poll(CHECK_INTERVAL / 2, metrics=metrics) is None, "checked before the interval"
    rules = reloader.poll(CHECK_INTERVAL, metrics=metrics)
    assert rules is not None and rules.get("default").description == "edited"
    assert reloader.poll(2 * CHECK_INTERVAL, metrics=metrics) is None, "the same edit loaded twice"


def test_a_new_rule_file_is_loaded_and_shown_in_the_metrics(
    reloader: RuleReloader, folder: Path, metrics: Metrics
) -> None:
    (folder / "portraits.toml").write_text('name = "portraits"\nmatch = ["portraits/**"]\n', encoding="utf-8")
    rules = reloader.poll(1.0, metrics=metrics)
    assert rules is not None and rules.names == ("default", "portraits")
    assert rules.select("portraits/a.png").name == "portraits"
    assert metrics.registry.get_sample_value("sinkwatch_rules_loaded") == 2
    for outcome in OUTCOMES:
        labels = {"rule": "portraits", "outcome": outcome}
        assert metrics.registry.get_sample_value("sinkwatch_images_processed_total", labels) == 0
    assert fingerprint_shown(metrics) == rules.fingerprint


def test_an_atomic_replace_of_the_same_size_and_mtime_is_a_change(
    reloader: RuleReloader, folder: Path, metrics: Metrics
) -> None:
    path = folder / "default.toml"
    path.write_text(DEFAULT + 'description = "a"\n', encoding="utf-8")
    assert reloader.poll(1.0, metrics=metrics) is not None
    before = path.stat()
    temp = folder.parent / "default.toml.new"
    temp.write_text(DEFAULT + 'description = "b"\n', encoding="utf-8")
    os.utime(temp, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(temp, path)
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    rules = reloader.poll(2.0, metrics=metrics)
    assert rules is not None and rules.get("default").description == "b"


def test_a_change_of_mode_alone_is_a_change(reloader: RuleReloader, folder: Path, metrics: Metrics) -> None:
    # A rule file the daemon's user cannot read fails to load; mending its mode or owner changes its ctime only.
    path = folder / "default.toml"
    before = path.stat()
    path.chmod(0o600)
    path.chmod(0o644)
    assert (path.stat().st_size, path.stat().st_mtime_ns, path.stat().st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )
    assert reloader.poll(1.0, metrics=metrics) is not None


def test_hidden_toml_files_are_no_rules(reloader: RuleReloader, folder: Path, metrics: Metrics) -> None:
    # Emacs locks a file it edits with a dangling symlink; macOS leaves AppleDouble files on foreign disks.
    (folder / ".#default.toml").symlink_to("user@host.1234:1700000000")
    (folder / "._default.toml").write_bytes(b"\x00\x05\x16\x07\xff\xfe")
    assert reloader.poll(1.0, metrics=metrics) is None
    assert failures(metrics) == 0
    assert RuleReloader(folder).load().names == ("default",)


def test_a_broken_file_keeps_the_last_good_rules_fails_once_and_recovers_when_fixed(
    reloader: RuleReloader, folder: Path, metrics: Metrics, errors: list[dict[str, Any]]
) -> None:
    good = fingerprint_shown(metrics)
    path = folder / "default.toml"
    path.write_text(BROKEN, encoding="utf-8")
    assert [reloader.poll(float(now), metrics=metrics) for now in range(1, 5)] == [None] * 4
    assert failures(metrics) == 1, "one broken state is one failure, however often it is checked"
    assert [(r["extra"]["file"], r["extra"]["field"]) for r in errors] == [(str(path), "resize.width")]
    assert fingerprint_shown(metrics) == good and metrics.registry.get_sample_value("sinkwatch_rules_loaded") == 1
    assert metrics.registry.get_sample_value("sinkwatch_rules_last_reload_successful") == 0

    path.write_text(DEFAULT + "[resize]\nwidth = 640\n", encoding="utf-8")
    rules = reloader.poll(5.0, metrics=metrics)
    assert rules is not None and rules.get("default").resize.width == 640
    assert fingerprint_shown(metrics) == rules.fingerprint != good
    assert failures(metrics) == 1 and len(errors) == 1
    assert metrics.registry.get_sample_value("sinkwatch_rules_last_reload_successful") == 1


def test_a_removed_rule_folder_keeps_the_rules_until_it_is_back(
    reloader: RuleReloader, folder: Path, metrics: Metrics
) -> None:
    shutil.rmtree(folder)
    assert reloader.poll(1.0, metrics=metrics) is None
    assert failures(metrics) == 1
    folder.mkdir()
    (folder / "default.toml").write_text(DEFAULT, encoding="utf-8")
    rules = reloader.poll(2.0, metrics=metrics)
    assert rules is not None and rules.names == ("default",)


def test_a_request_reloads_at_the_next_poll_whatever_the_interval(reloader: RuleReloader, metrics: Metrics) -> None:
    reloader.request()
    rules = reloader.poll(0.1, metrics=metrics)
    assert rules is not None and rules.names == ("default",), "an unchanged folder is reloaded on request"
    assert reloader.poll(0.2, metrics=metrics) is None, "the request was not used up"
    assert reloader.poll(CHECK_INTERVAL + 0.1, metrics=metrics) is None


def test_a_request_that_meets_a_broken_folder_is_one_failure(
    reloader: RuleReloader, folder: Path, metrics: Metrics
) -> None:
    (folder / "default.toml").write_text(BROKEN, encoding="utf-8")
    reloader.request()
    assert reloader.poll(0.1, metrics=metrics) is None
    assert reloader.poll(1.5, metrics=metrics) is None
    assert failures(metrics) == 1


def test_the_shipped_presets_reload_only_on_request(metrics: Metrics) -> None:
    reloader = RuleReloader(None)
    presets = reloader.load()
    assert [reloader.poll(float(now), metrics=metrics) for now in range(3)] == [None] * 3
    reloader.request()
    rules = reloader.poll(3.0, metrics=metrics)
    assert rules is not None and rules.fingerprint == presets.fingerprint == load_rules(None).fingerprint
    assert metrics.registry.get_sample_value("sinkwatch_rules_loaded") == len(presets.names)


def test_a_rule_folder_that_cannot_be_listed_is_a_failed_reload_not_a_crash(
    reloader: RuleReloader, metrics: Metrics
) -> None:
    # Root reads any folder, so "cannot list" comes from the descriptor limit here; a folder made
    # unreadable (chmod 000) for the daemon's user fails the same way: listing it raises an OSError.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    reloader.request()
    resource.setrlimit(resource.RLIMIT_NOFILE, (0, hard))
    try:
        rules = reloader.poll(1.0, metrics=metrics)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert rules is None
    assert failures(metrics) == 1
    assert reloader.poll(2.0, metrics=metrics) is not None, "listable again: the next check loads the rules"


def test_an_edit_made_while_the_first_load_reads_is_not_lost(
    folder: Path, metrics: Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    def load_then_edit(directory: Path | None) -> RuleSet:
        rules = load_rules(directory)
        (folder / "default.toml").write_text(DEFAULT + 'description = "edited meanwhile"\n', encoding="utf-8")
        return rules

    monkeypatch.setattr(service.reload, "load_rules", load_then_edit)
    reloader = RuleReloader(folder)
    assert reloader.load().get("default").description != "edited meanwhile"
    monkeypatch.undo()
    rules = reloader.poll(0.0, metrics=metrics)
    assert rules is not None and rules.get("default").description == "edited meanwhile"


def test_a_glob_with_a_reversed_range_keeps_the_last_good_rules(
    reloader: RuleReloader, folder: Path, metrics: Metrics, errors: list[dict[str, Any]]
) -> None:
    good = fingerprint_shown(metrics)
    path = folder / "portraits.toml"
    path.write_text('name = "portraits"\nmatch = ["portrait_[z-a]*.png"]\npriority = 10\n', encoding="utf-8")
    assert reloader.poll(1.0, metrics=metrics) is None
    assert failures(metrics) == 1 and fingerprint_shown(metrics) == good
    assert [(r["extra"]["file"], r["extra"]["field"]) for r in errors] == [(str(path), "match[0]")]


def test_any_exception_while_loading_keeps_the_last_good_rules_and_is_logged_with_its_traceback(
    reloader: RuleReloader,
    folder: Path,
    metrics: Metrics,
    errors: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def buggy(directory: Path | None) -> RuleSet:
        raise ZeroDivisionError("a bug in rule loading")

    good = fingerprint_shown(metrics)
    monkeypatch.setattr(service.reload, "load_rules", buggy)
    reloader.request()
    assert reloader.poll(1.0, metrics=metrics) is None
    assert failures(metrics) == 1 and fingerprint_shown(metrics) == good
    [record] = errors
    assert "ZeroDivisionError" in record["message"] and "a bug in rule loading" in record["message"]
    assert record["exception"] is not None and record["exception"].type is ZeroDivisionError
    assert record["extra"]["file"] == str(folder)

    monkeypatch.undo()
    (folder / "default.toml").write_text(DEFAULT + 'description = "fixed"\n', encoding="utf-8")
    rules = reloader.poll(2.0, metrics=metrics)
    assert rules is not None and rules.get("default").description == "fixed"
    assert failures(metrics) == 1
