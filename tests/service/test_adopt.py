"""Outputs in the queue that their sidecar proves were made from a source's current bytes are kept and
recorded, not made (nor sent to ComfyUI) again: when the ledger has no row for the source (the state
folder was deleted, lost with its disk, or moved with --state-dir), or a row that is not "published"
(a retry, a rejected version since put back). Anything that does not hold up, the source or the frame
changed, an old sidecar, is made as for a new source."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from service import file_hash, ownership
from service.encode import encode_png
from service.engine import Candidate, Engine
from service.ledger import Entry, Ledger
from service.ledger_stamps import file_stamp
from service.metrics import Metrics
from service.outcomes import Outcomes
from service.ownership import is_own_or_free
from service.publish import Publisher
from service.recovery import recover
from service.rules import Rule, load_rules
from service.runner import Job, Outcome, process_job
from tests.conftest import load_photo, photo_file, wait_for
from tests.service.conftest import IdleEngine, replace_keeping_mtime


class Queue:
    """One queue folder and a watch folder, run against one ledger after another, the engine's part by hand."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.watch = tmp_path / "watch"
        self.watch.mkdir()
        self.queue = tmp_path / "queue"
        self.publisher = Publisher(self.queue)
        self.rule = load_rules(None).get("default")
        self.announced: list[tuple[str, str, int, int]] = []
        self.ledger = self.fresh_ledger()

    def fresh_ledger(self) -> Ledger:
        """A ledger of its own: what the daemon opens when the old one is gone."""
        path = self.tmp_path / f"ledger-{len(list(self.tmp_path.glob('ledger-*.sqlite3')))}.sqlite3"
        self.ledger = Ledger(path)
        self.metrics = Metrics(CollectorRegistry())
        self.outcomes = Outcomes(
            ledger=self.ledger, publisher=self.publisher, metrics=self.metrics, max_attempts=3, retry_base=1.0
        )
        self.outcomes.on_published = lambda *args: self.announced.append(args)
        return self.ledger

    def photo(self, name: str, photo: str = "chelsea") -> Path:
        path = self.watch / name
        shutil.copyfile(photo_file(photo), path)
        return path

    def run(self, source: Path, *, rule: Rule | None = None) -> Outcome:
        """One attempt at `source` as the engine makes it: a name, a started row, the job, its outcome recorded."""
        rule = rule or self.rule
        key = source.name
        entry = self.ledger.get(key)
        name = self.ledger.name_for(
            key, source.stem, exists=lambda n: not is_own_or_free(self.publisher, n, key, source)
        )
        st = source.stat()
        known = entry.sha256 if entry is not None and entry.state == "published" else None
        self.ledger.start(
            key, size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=known, rule=rule.name, fingerprint=rule.fingerprint
        )
        job = Job(
            source=source,
            key=key,
            name=name,
            rule=rule,
            queue=self.queue,
            max_bytes=1 << 30,
            max_pixels=1 << 30,
            known_sha256=known,
            adopt=True,
        )
        outcome = process_job(job)
        if outcome.status != "name_taken":  # the engine's own business: a new name, and the source again
            self.outcomes.handle(job, outcome, seen_at=None)
        return outcome

    def entry(self, key: str) -> Entry:
        entry = self.ledger.get(key)
        assert entry is not None, f"no ledger row for {key}"
        return entry

    def outputs(self, name: str) -> dict[str, tuple[bytes, int]]:
        """Bytes and mtime of each output of `name`."""
        paths = {
            "frame": self.publisher.frame_path(name),
            "heatmap": self.publisher.heatmap_path(name),
            "sidecar": self.publisher.sidecar_path(name),
        }
        return {kind: (path.read_bytes(), path.stat().st_mtime_ns) for kind, path in paths.items()}

    def sidecar(self, name: str) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.publisher.sidecar_path(name).read_text(encoding="utf-8"))
        return value

    def processed(self, outcome: str) -> float | None:
        return self.metrics.registry.get_sample_value(
            "sinkwatch_images_processed_total", {"rule": self.rule.name, "outcome": outcome}
        )


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[Queue]:
    made = Queue(tmp_path)
    yield made
    made.ledger.close()


def test_outputs_made_from_the_current_bytes_are_kept_and_recorded_not_made_again(queue: Queue) -> None:
    source = queue.photo("cat.png")
    first = queue.run(source)
    assert first.status == "published"
    before = queue.outputs("cat")
    queue.announced.clear()
    queue.ledger.close()
    queue.fresh_ledger()

    outcome = queue.run(source)
    assert outcome.status == "adopted"
    assert queue.outputs("cat") == before, "an output was written again"
    entry = queue.entry("cat.png")
    assert (entry.state, entry.output_name) == ("published", "cat")
    stamp = queue.ledger.stamps(["cat.png"])["cat.png"]
    assert stamp.file == file_stamp(source.stat()), "the whole stamp, so that the next scan needs no hashing"
    assert (entry.sha256, entry.frame_sha256) == (first.sha256, first.frame_sha256)
    assert (entry.rule, entry.fingerprint) == ("default", queue.rule.fingerprint)
    assert queue.outcomes.counts == {"published": 0, "rejected": 0, "retried": 0, "skipped": 1, "ignored": 0}
    assert (queue.processed("skipped"), queue.processed("published")) == (1, 0)
    assert queue.announced == [("cat", "cat.png", 832, 480)], "the upload the lost ledger owed is owed again"

    # From now on the ledger knows it: the next look is the usual unchanged-content check.
    st = source.stat()
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert queue.run(source).status == "skipped"
    assert queue.outputs("cat") == before


def test_an_upload_the_sidecar_records_is_not_owed_again(queue: Queue) -> None:
    source = queue.photo("cat.png")
    queue.run(source)
    sidecar = queue.sidecar("cat")
    sidecar["comfyui"] = {"upload": "cat.png", "prompt_id": "1234"}
    queue.publisher.write_sidecar("cat", sidecar)
    queue.announced.clear()
    queue.ledger.close()
    queue.fresh_ledger()
    assert queue.run(source).status == "adopted"
    assert queue.announced == []


def test_outputs_of_a_rule_changed_since_are_kept_and_the_ledger_names_the_rule_that_made_them(
    queue: Queue,
) -> None:
    source = queue.photo("cat.png")
    queue.run(source)
    queue.ledger.close()
    queue.fresh_ledger()
    strong = load_rules(None).get("strong")
    assert queue.run(source, rule=strong).status == "adopted"
    entry = queue.entry("cat.png")
    assert (entry.rule, entry.fingerprint) == ("default", queue.rule.fingerprint)


def test_a_source_rewritten_with_other_bytes_of_its_size_and_mtime_is_made_again(queue: Queue) -> None:
    # The same pixels in another file of the same size: only hashing tells them apart.
    source = queue.watch / "cat.png"
    first, other = (encode_png(load_photo("chelsea"), text={"note": note}) for note in ("first", "other"))
    assert len(first) == len(other) and first != other
    source.write_bytes(first)
    queue.run(source)
    old = queue.sidecar("cat")["source"]["sha256"]
    replace_keeping_mtime(source, other)
    queue.ledger.close()
    queue.fresh_ledger()

    outcome = queue.run(source)
    assert outcome.status == "published"
    assert queue.sidecar("cat")["source"]["sha256"] == outcome.sha256 != old
    assert queue.entry("cat.png").frame_sha256 == outcome.frame_sha256


def test_a_frame_edited_in_the_queue_is_not_taken_over(queue: Queue) -> None:
    source = queue.photo("cat.png")
    queue.run(source)
    frame = queue.publisher.frame_path("cat")
    frame.write_bytes(frame.read_bytes()[:-10])  # the user's own edit of the frame
    edited = frame.read_bytes()
    queue.ledger.close()
    queue.fresh_ledger()

    outcome = queue.run(source)
    assert outcome.status == "published"
    assert frame.read_bytes() == edited, "the user's file was overwritten"
    assert queue.entry("cat.png").output_name != "cat"
    assert queue.publisher.frame_path(str(queue.entry("cat.png").output_name)).is_file()


# A sidecar that still names the frame's hash keeps the frame the source's own, made again in place; one
# that does not leaves the frame as someone else's file, and the source's outputs go to a new name.
@pytest.mark.parametrize(
    ("damage", "in_place"),
    [
        ("wrong size", True),
        ("wrong width", True),
        ("no rule", True),
        ("no frame hash", False),
        ("not json", False),
        ("other source", False),
    ],
)
def test_a_sidecar_that_does_not_prove_the_outputs_gets_them_made_again(
    queue: Queue, damage: str, in_place: bool
) -> None:
    source = queue.photo("cat.png")
    queue.run(source)
    frame = queue.publisher.frame_path("cat")
    sidecar = queue.sidecar("cat")
    if damage == "no frame hash":  # written before frames were hashed
        del sidecar["output"]["frame_sha256"]
    elif damage == "wrong size":
        sidecar["source"]["size"] += 1
    elif damage == "wrong width":  # what an upload owed to ComfyUI would be queued with
        sidecar["output"]["width"] = 99999
    elif damage == "no rule":
        sidecar["rule"] = "default"
    elif damage == "other source":
        sidecar["source"]["key"] = sidecar["source"]["path"] = "dog.png"
    text = "{" if damage == "not json" else json.dumps(sidecar)
    queue.publisher.sidecar_path("cat").write_text(text, encoding="utf-8")
    written = frame.stat().st_mtime_ns
    queue.ledger.close()
    queue.fresh_ledger()

    outcome = queue.run(source)
    assert outcome.status == "published"
    assert (outcome.name == "cat") == in_place
    assert (frame.stat().st_mtime_ns != written) == in_place, "a frame not provably ours was replaced"
    assert queue.sidecar(outcome.name)["output"]["frame_sha256"] == outcome.frame_sha256


def test_a_missing_heatmap_gets_the_outputs_made_again_in_place(queue: Queue) -> None:
    source = queue.photo("cat.png")
    queue.run(source)
    queue.publisher.heatmap_path("cat").unlink()
    queue.ledger.close()
    queue.fresh_ledger()
    outcome = queue.run(source)
    assert (outcome.status, outcome.name) == ("published", "cat")
    assert queue.publisher.heatmap_path("cat").is_file()


def test_a_link_at_the_frame_name_is_not_taken_over_even_to_the_same_bytes(queue: Queue, tmp_path: Path) -> None:
    source = queue.photo("cat.png")
    queue.run(source)
    frame = queue.publisher.frame_path("cat")
    copy = tmp_path / "copy.png"
    shutil.copyfile(frame, copy)
    frame.unlink()
    frame.symlink_to(copy)  # put there after the engine chose the name: the worker must see it too
    queue.ledger.close()
    queue.fresh_ledger()
    job = Job(
        source=source, key="cat.png", name="cat", rule=queue.rule, queue=queue.queue,
        max_bytes=1 << 30, max_pixels=1 << 30, adopt=True,
    )  # fmt: skip
    assert process_job(job).status == "name_taken"
    assert frame.is_symlink() and frame.read_bytes() == copy.read_bytes()


def test_taking_over_removes_an_old_reject_record_of_the_name(queue: Queue) -> None:
    source = queue.photo("cat.png")
    queue.run(source)
    # Left by a broken version of the source since restored, as a publication would have removed it.
    queue.publisher.reject("cat", {"reason": "corrupt"})
    queue.ledger.close()
    queue.fresh_ledger()
    assert queue.run(source).status == "adopted"
    assert not queue.publisher.reject_path("cat").exists()


@pytest.fixture
def made_by_process(queue: Queue, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Outputs `sinkwatch process watch/cat.png` made: keyed by the resolved path, the path recorded as given."""
    source = queue.photo("cat.png")
    monkeypatch.chdir(queue.tmp_path)
    job = Job(
        source=Path("watch/cat.png"), key=str(source.resolve()), name="cat", rule=queue.rule, queue=queue.queue,
        max_bytes=1 << 30, max_pixels=1 << 30,
    )  # fmt: skip
    assert process_job(job).status == "published"
    assert queue.sidecar("cat")["source"]["path"] == "watch/cat.png"
    queue.ledger.close()
    queue.fresh_ledger()
    return source


def test_outputs_made_by_process_from_a_relative_path_are_taken_over(queue: Queue, made_by_process: Path) -> None:
    outcome = queue.run(made_by_process)
    assert (outcome.status, outcome.name) == ("adopted", "cat")


def test_a_crash_while_taking_over_outputs_made_by_process_is_settled_by_recovery(
    queue: Queue, made_by_process: Path
) -> None:
    # What the engine had done when the daemon died: the name, the row in "processing"; the worker's outcome lost.
    name = queue.ledger.name_for(
        "cat.png", "cat", exists=lambda n: not is_own_or_free(queue.publisher, n, "cat.png", made_by_process)
    )
    st = made_by_process.stat()
    queue.ledger.start(
        "cat.png", size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=None, rule="default", fingerprint="x"
    )
    requeued: list[str] = []
    settled = recover(
        queue.ledger,
        queue.publisher,
        resolve=lambda key: queue.watch / key,
        requeue=lambda entry, _path, _alone: requeued.append(entry.relpath),
    )
    assert (name, settled, requeued) == ("cat", 1, [])
    assert queue.entry("cat.png").state == "published"


@pytest.mark.parametrize("force", [False, True])
def test_the_engine_takes_over_what_a_lost_ledger_knew_unless_forced(
    tmp_path: Path, idle_engine: IdleEngine, force: bool
) -> None:
    watch = tmp_path / "watch"
    watch.mkdir()
    sources = {name: watch / f"{name}.png" for name in ("chelsea", "coffee", "rocket")}
    for name, path in sources.items():
        shutil.copyfile(photo_file(name), path)

    def run_all(engine: Engine) -> dict[str, int]:
        for path in sources.values():
            assert engine.offer(Candidate(path.name, path, "scan", 0.0))
        wait_for(lambda: engine.pump(timeout=0.2) >= 0 and engine.idle(), timeout=120)
        return {key: value for key, value in engine.counts.items() if value}

    def outputs() -> dict[str, tuple[bytes, int]]:
        files = (path for path in (tmp_path / "queue").rglob("*") if path.is_file())
        return {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in files}

    with Ledger(tmp_path / "first.sqlite3") as first:
        assert run_all(idle_engine(resolve=lambda key: watch / key, ledger=first)) == {"published": 3}
    before = outputs()
    with Ledger(tmp_path / "second.sqlite3") as second:
        engine = idle_engine(resolve=lambda key: watch / key, ledger=second, force=force)
        assert run_all(engine) == ({"published": 3} if force else {"skipped": 3})
        assert {entry.relpath: entry.output_name for entry in second.entries("published")} == {
            f"{name}.png": name for name in sources
        }
    after = outputs()
    frames = [f"{name}.png" for name in sources]
    assert {name: after[name][0] for name in frames} == {name: before[name][0] for name in frames}, "same bytes"
    rewritten = {name for name in before if after[name][1] != before[name][1]}
    assert rewritten == (set(before) if force else set())


def test_a_source_changed_while_its_outputs_were_checked_is_tried_again_and_then_taken_over(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = queue.photo("cat.png")
    queue.run(source)
    queue.ledger.close()
    queue.fresh_ledger()
    real = file_hash.sha256_file

    def hash_then_rewrite(path: Path) -> str | None:
        digest = real(path)
        if path == source:  # the generator writes the file again right after it was hashed
            source.write_bytes(source.read_bytes())
        return digest

    monkeypatch.setattr(ownership, "sha256_file", hash_then_rewrite)
    assert queue.run(source).status == "retry"
    monkeypatch.undo()
    # The ledger has a row now, in "retry": the next attempt still takes the outputs over.
    assert queue.entry("cat.png").state == "retry"
    assert queue.run(source).status == "adopted"


def test_a_source_rejected_then_restored_to_the_published_bytes_keeps_its_outputs(queue: Queue) -> None:
    source = queue.photo("cat.png")
    good = source.read_bytes()
    assert queue.run(source).status == "published"
    before = queue.outputs("cat")
    source.write_bytes(b"not an image at all")
    assert queue.run(source).status == "rejected"
    assert queue.publisher.reject_path("cat").is_file()
    source.write_bytes(good)  # the user puts the original back

    assert queue.run(source).status == "adopted"
    assert queue.outputs("cat") == before, "an output was written again"
    assert not queue.publisher.reject_path("cat").exists()
    assert queue.entry("cat.png").state == "published"


def test_the_engine_takes_over_outputs_for_a_source_it_has_a_row_of_that_is_not_published(
    tmp_path: Path, idle_engine: IdleEngine
) -> None:
    watch = tmp_path / "watch"
    watch.mkdir()
    source = watch / "cat.png"
    shutil.copyfile(photo_file("chelsea"), source)
    with Ledger(tmp_path / "ledger.sqlite3") as ledger:
        engine = idle_engine(resolve=lambda key: watch / key, ledger=ledger)

        def run_once() -> dict[str, int]:
            before = dict(engine.counts)
            assert engine.offer(Candidate("cat.png", source, "scan", 0.0))
            wait_for(lambda: engine.pump(timeout=0.2) >= 0 and engine.idle(), timeout=120)
            return {key: value - before[key] for key, value in engine.counts.items() if value != before[key]}

        assert run_once() == {"published": 1}
        # What a rejected version of the file since put back leaves in the ledger.
        ledger.rejected("cat.png", reason="corrupt", message="", sha256="0" * 64)
        st = source.stat()
        os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        assert run_once() == {"skipped": 1}
        entry = ledger.get("cat.png")
        assert entry is not None and entry.state == "published"
