"""Folders that stop being writable, sources that vanish or change, a watch folder that goes away.

Promises under test: a read-only queue is a retry (counted as
``sinkwatch_publish_errors_total{reason="read_only"}``) and nothing is lost
when it is writable again; a source deleted between its event and its decode
leaves no trace, one replaced in that window is published with its final
content only; the daemon reports a vanished watch folder (log line, /healthz
503), and resumes (200, new files processed) when it comes back.
"""

from __future__ import annotations

import os
import random
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from service import runner
from service.decode import decode_file
from service.ledger import Ledger
from service.rules import load_rules
from tests.conftest import wait_for
from tests.e2e.conftest import DaemonProcess, frames
from tests.faults.images import Images
from tests.faults.outputs import (
    assert_same_outputs,
    check_published_set,
    reference_run,
    rejects,
    sha256,
    sidecars,
    temp_files,
)
from tests.faults.presets import copy_presets
from tests.faults.readings import health, log_records, metric, published_records
from tests.faults.tmpfs import Tmpfs
from tests.faults.writers import Writer, write_atomically, write_in_chunks

SEED = 44


@pytest.mark.slow
def test_queue_read_only_and_back_while_images_flow(
    tmp_path: Path,
    images: Images,
    tmpfs: Callable[[str, str], Tmpfs],
    daemons: list[DaemonProcess],
    counts: Callable[..., None],
) -> None:
    fs = tmpfs("qfs", "64m")
    watch, queue, state = tmp_path / "watch", fs.path / "queue", tmp_path / "state"
    watch.mkdir()
    daemon = DaemonProcess(watch, queue, tmp_path / "daemon.log", "--state-dir", str(state), "--retry-base", "0.2")
    daemons.append(daemon)
    daemon.start()
    files = [(f"ro_{i:02d}.png", images.make(i, side=128)) for i in range(24)]
    writer = Writer(watch, files, seed=SEED, pause=(0.1, 0.5))
    writer.start()
    toggles, refused, frozen_checks = 4, 0, 0
    try:
        wait_for(lambda: len(frames(queue)) >= 2, timeout=60)
        for _ in range(toggles):
            before = metric(daemon, "sinkwatch_publish_errors_total", reason="read_only")
            fs.remount(read_only=True)
            visible = sorted(p.name for p in frames(queue))

            def refused_and_frozen(visible: list[str] = visible, before: float = before) -> bool:
                nonlocal frozen_checks
                assert sorted(p.name for p in frames(queue)) == visible, "a frame appeared on a read-only queue"
                frozen_checks += 1
                return metric(daemon, "sinkwatch_publish_errors_total", reason="read_only") > before

            wait_for(refused_and_frozen, timeout=30)
            assert health(daemon) == 200, "a read-only queue must not make the daemon unhealthy"
            fs.remount(read_only=False)
            refused += 1
    finally:
        if _read_only(fs.path):
            fs.remount(read_only=False)
        writer.finish()
    wait_for(lambda: len(sidecars(queue)) == len(files), timeout=90)
    assert daemon.stop() == 0, daemon.log.read_text()[-3000:]

    errors = _log_counts(daemon)
    counts(sources=len(files), read_only_phases=toggles, phases_refused=refused, frozen_checks=frozen_checks, **errors)
    assert errors["read_only_errors"] >= toggles
    by_key = check_published_set(queue)
    assert sorted(by_key) == sorted(name for name, _ in files)
    assert all(by_key[name]["source"]["sha256"] == sha256(data) for name, data in files)
    assert rejects(queue) == {}, "a read-only queue must never reject an image"
    assert temp_files(queue) == []


def _log_counts(daemon: DaemonProcess) -> dict[str, int]:
    """Counts taken from the log of a stopped daemon (its /metrics is gone)."""
    records = log_records(daemon.log)
    retries = [r for r in records if str(r["message"]).startswith("retrying ")]
    return {
        "read_only_errors": sum("EROFS" in str(r["message"]) for r in retries),
        "retry_log_lines": len(retries),
    }


def _read_only(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


@pytest.mark.slow
def test_sources_deleted_or_replaced_between_event_and_decode(
    tmp_path: Path, images: Images, daemons: list[DaemonProcess], counts: Callable[..., None]
) -> None:
    """Two slow "blocker" images hold both workers; the victims' events are taken meanwhile, then they change."""
    watch, queue, reference = tmp_path / "watch", tmp_path / "queue", tmp_path / "reference"
    watch.mkdir()
    rules = copy_presets(tmp_path / "rules")
    # A 3072x3072 output keeps a worker busy for seconds: the window between event and decode.
    (rules / "blocker.toml").write_text(
        'name = "blocker"\nmatch = ["blocker_*"]\npriority = 100\n[resize]\nwidth = 3072\nheight = 3072\n'
    )
    daemon = DaemonProcess(watch, queue, tmp_path / "daemon.log", "--rules", str(rules))
    daemons.append(daemon)
    daemon.start()

    for i in range(2):
        (watch / f"blocker_{i}.png").write_bytes(images.make(100 + i, side=96))
    wait_for(lambda: metric(daemon, "sinkwatch_in_flight") >= 2, timeout=30)
    rng = random.Random(SEED)
    deleted = [f"gone_{i}.png" for i in range(4)]
    replaced = [f"swap_{i}.png" for i in range(4)]
    victims = deleted + replaced
    rng.shuffle(victims)
    first = {name: images.make(200 + i, side=128) for i, name in enumerate(victims)}
    final = {name: images.make(300 + i, side=144) for i, name in enumerate(replaced)}
    for name in victims:
        write_in_chunks(watch / name, first[name])
    wait_for(lambda: metric(daemon, "sinkwatch_images_discovered_total", source="event") >= 2 + len(victims))
    # The window is still open: both blockers are still being processed, so no victim was decoded yet.
    assert not any(name.startswith("blocker_") for name in (p.name for p in frames(queue))), "blockers too fast"
    for name in victims:
        if name in deleted:
            (watch / name).unlink()
        else:
            write_atomically(watch / name, final[name])

    def settled() -> bool:
        return (
            len(frames(queue)) >= 2 + len(replaced)
            and metric(daemon, "sinkwatch_queue_depth") == 0
            and metric(daemon, "sinkwatch_in_flight") == 0
        )

    wait_for(settled, timeout=90)
    assert daemon.stop() == 0, daemon.log.read_text()[-3000:]

    publications = Counter(str(r["extra"]["source"]) for r in published_records(daemon.log))
    counts(victims=len(victims), deleted=len(deleted), replaced=len(replaced), publications=dict(publications))
    by_key = check_published_set(queue)
    assert sorted(by_key) == sorted(["blocker_0.png", "blocker_1.png", *replaced])
    assert rejects(queue) == {}
    with Ledger(queue / ".sinkwatch" / "state" / "ledger.sqlite3") as ledger:
        for name in deleted:
            entry = ledger.get(name)
            assert entry is None or entry.state not in ("published", "rejected", "retry"), entry
        entries = {name: ledger.get(name) for name in replaced}
    rule_set = load_rules(rules)
    for name in replaced:
        assert publications[name] == 1, f"{name} published {publications[name]} times"
        assert by_key[name]["source"]["sha256"] == sha256(final[name]), f"{name}: not its final content"
        entry = entries[name]
        assert entry is not None and entry.state == "published" and entry.output_name
        outcome = reference_run(
            watch.resolve() / name, key=name, name=entry.output_name, rule=rule_set.select(name), queue=reference
        )
        assert outcome.status == "published", outcome
        assert_same_outputs(queue, reference, entry.output_name)


# -- the single runner, in process: the source changes at exactly the wrong moment ----------------


@pytest.mark.parametrize("fault", ["deleted", "replaced", "grown"])
def test_runner_source_changing_between_stat_and_decode_is_a_retry_and_writes_nothing(
    tmp_path: Path, images: Images, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    watch, queue = tmp_path / "watch", tmp_path / "queue"
    watch.mkdir()
    source = watch / "victim.png"
    source.write_bytes(images.make(1, side=128))
    other = images.make(2, side=160)

    def decode_after_fault(path: Path, **kwargs: object) -> object:
        if fault == "deleted":
            source.unlink()
        elif fault == "replaced":
            write_atomically(source, other)
        else:
            with source.open("ab") as handle:
                handle.write(b"\0" * 64)
        return decode_file(path, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(runner, "decode_file", decode_after_fault)
    outcome = reference_run(source, key="victim.png", name="victim", rule=load_rules(None).get("default"), queue=queue)
    assert outcome.status == "retry", outcome
    assert outcome.reason == "incomplete" and outcome.transient
    assert not queue.exists() or not any(p.is_file() for p in queue.rglob("*")), "a changed source left outputs"


def test_runner_source_gone_before_it_starts_is_skipped(tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    outcome = reference_run(
        tmp_path / "never-there.png", key="never-there.png", name="x", rule=load_rules(None).get("default"), queue=queue
    )
    assert outcome.status == "skipped" and outcome.reason == "vanished", outcome
    assert not queue.exists()


# -- the watch folder itself ----------------------------------------------------------------------


@pytest.mark.slow
def test_watch_folder_removed_and_recreated(
    tmp_path: Path, images: Images, daemons: list[DaemonProcess], counts: Callable[..., None]
) -> None:
    watch, queue, away = tmp_path / "watch", tmp_path / "queue", tmp_path / "watch-away"
    watch.mkdir()
    # Far beyond the test: a file in the new folder must come from its events, not a rescan.
    daemon = DaemonProcess(watch, queue, tmp_path / "daemon.log", "--rescan-interval", "600")
    daemons.append(daemon)
    daemon.start()
    published: dict[str, bytes] = {}
    history: list[tuple[str, str]] = []

    def drop(name: str, data: bytes) -> None:
        write_in_chunks(watch / name, data)
        published[name] = data
        history.append((name, sha256(data)))
        wait_for(lambda: (name, sha256(data)) in sidecars(queue, per_image=True), timeout=30)

    drop("before.png", images.make(1, side=128))

    def said(text: str) -> int:
        return sum(text in str(r["message"]) for r in log_records(daemon.log))

    statuses: list[tuple[str, int, int]] = []
    # "removed" and "renamed" wait until the daemon has reported the loss; "flapped" comes back at once,
    # possibly before the daemon's loop looked (then it only finds a dead observer to restart).
    cycles = ["removed", "renamed", "removed", "flapped"]
    for cycle, how in enumerate(cycles):
        reported_before = said("disappeared")
        if how == "renamed":
            watch.rename(away)
        else:
            shutil.rmtree(watch)
        if how != "flapped":
            wait_for(lambda: health(daemon) == 503, timeout=15)

            def loss_reported(before: int = reported_before) -> bool:
                return said("disappeared") > before

            wait_for(loss_reported, timeout=15)
        gone = health(daemon)
        if how == "renamed":
            away.rename(watch)
        else:
            watch.mkdir()
        wait_for(lambda: health(daemon) == 200, timeout=15)
        statuses.append((how, gone, health(daemon)))
        # A new file, and a new image under an old name (see the end).
        drop(f"after_{cycle}.png", images.make(10 + cycle, side=128))
        drop("before.png", images.make(20 + cycle, side=112))
    assert daemon.stop() == 0, daemon.log.read_text()[-3000:]

    reported, back, restarted = said("disappeared"), said("is back"), said("restarted it")
    counts(
        cycles=len(cycles),
        health=statuses,
        reported_gone=reported,
        reported_back=back,
        observer_restarts=restarted,
        files=len(published),
    )
    waited = len(cycles) - cycles.count("flapped")
    assert reported == back and waited <= reported <= len(cycles)
    assert reported + restarted >= len(cycles) - cycles.count("renamed"), "a lost watch went unreported"
    by_image = check_published_set(queue, per_image=True)
    assert {key for key, _sha in by_image} == set(published)
    assert all((name, sha256(data)) in by_image for name, data in published.items())
    # Removed, the folder took before.png with it: the image put there next is another one, and the frame of the
    # one before stays. Renamed away and back, it stayed, and its new content replaced its frame.
    before = [digest for name, digest in history if name == "before.png"]  # the first, then one per cycle
    kept = {digest for key, digest in by_image if key == "before.png"}
    assert {before[0], before[2]} <= kept and before[1] not in kept, (before, kept)
