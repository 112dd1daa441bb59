"""service.outcomes: what each finished job leaves behind, in the ledger, the queue, the counts and the metrics.

Each source goes the way the engine sends it: an attempt started in a real SQLite ledger, the
real runner (in this process) on a real image, its outcome handed to Outcomes. Retry times come
from an injected clock.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from loguru import logger
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from prometheus_client import CollectorRegistry

from service.decode import TEXT_VALUE_LIMIT
from service.file_hash import sha256_file
from service.ledger import Entry, Ledger
from service.metrics import OUTCOMES, Metrics
from service.outcomes import MAX_PUBLISH_RETRY_DELAY, Outcomes
from service.publish import Publisher
from service.recovery import recover
from service.rules import load_rules
from service.runner import Job, Outcome, process_job
from tests.conftest import photo_file

NOW = 1_000_000.0
MAX_ATTEMPTS = 3
RETRY_BASE = 10.0


class Bench:
    """Outcomes on a real ledger, queue folder and metrics, and the engine's part done by hand."""

    def __init__(self, tmp_path: Path, ledger: Ledger) -> None:
        self.watch = tmp_path / "watch"
        self.watch.mkdir()
        self.queue = tmp_path / "queue"
        self.ledger = ledger
        self.rule = load_rules(None).get("default")
        self.metrics = Metrics(CollectorRegistry())
        self.outcomes = Outcomes(
            ledger=ledger,
            publisher=Publisher(self.queue),
            metrics=self.metrics,
            max_attempts=MAX_ATTEMPTS,
            retry_base=RETRY_BASE,
            clock=lambda: NOW,
        )

    def photo(self, name: str, *, cut: int = 0) -> Path:
        """A real PNG in the watch folder; `cut` bytes short of its end when asked (still being written)."""
        data = photo_file("chelsea").read_bytes()
        path = self.watch / name
        path.write_bytes(data[: len(data) - cut])
        return path

    def start(self, source: Path, *, queue: Path | None = None) -> Job:
        """What the engine does before a worker gets the source: its name, one more attempt, the job."""
        key = source.name
        entry = self.ledger.get(key)
        known = entry.sha256 if entry is not None and entry.state == "published" else None
        st = source.stat()
        made_by = (self.rule.name, self.rule.fingerprint)
        if known is not None and entry is not None and entry.rule and entry.fingerprint:
            made_by = (entry.rule, entry.fingerprint)  # unchanged content keeps the rule that made its outputs
        self.ledger.start(
            key, size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=known, rule=made_by[0], fingerprint=made_by[1]
        )
        name = self.ledger.name_for(key, source.stem, exists=lambda _name: False)
        return Job(
            source=source,
            key=key,
            name=name,
            rule=self.rule,
            queue=queue or self.queue,
            max_bytes=1 << 30,
            max_pixels=1 << 30,
            known_sha256=known,
        )

    def run(self, source: Path, *, queue: Path | None = None) -> Outcome:
        """One attempt at `source`, recorded by Outcomes (publish latency not measured)."""
        job = self.start(source, queue=queue)
        outcome = process_job(job)
        self.outcomes.handle(job, outcome, seen_at=None)
        return outcome

    def entry(self, key: str) -> Entry:
        entry = self.ledger.get(key)
        assert entry is not None, f"no ledger row for {key}"
        return entry

    def reject_record(self, name: str) -> dict[str, Any]:
        record: dict[str, Any] = json.loads(Publisher(self.queue).reject_path(name).read_text(encoding="utf-8"))
        return record

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)

    def counted(self) -> dict[str, int]:
        """The outcome counts, checked against the processed counter: both must tell the same story."""
        for outcome in OUTCOMES:
            processed = self.sample("sinkwatch_images_processed_total", rule=self.rule.name, outcome=outcome)
            assert processed == self.outcomes.counts[outcome], outcome
        return {outcome: count for outcome, count in self.outcomes.counts.items() if count}


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Bench]:
    with Ledger(tmp_path / "ledger.sqlite3") as ledger:
        yield Bench(tmp_path, ledger)


# --- published and skipped ----------------------------------------------------------------------


def test_a_published_source_is_recorded_counted_measured_and_announced(bench: Bench) -> None:
    source = bench.photo("cat.png")
    announced: list[tuple[str, str, int, int]] = []
    bench.outcomes.on_published = lambda *args: announced.append(args)
    job = bench.start(source)
    outcome = process_job(job)
    assert outcome.status == "published"
    bench.outcomes.handle(job, outcome, seen_at=outcome.finished_at - 2.5)

    entry = bench.entry("cat.png")
    st = source.stat()
    assert (entry.state, entry.size, entry.mtime_ns, entry.sha256) == (
        "published",
        st.st_size,
        st.st_mtime_ns,
        outcome.sha256,
    )
    assert (entry.rule, entry.fingerprint, entry.output_name) == ("default", bench.rule.fingerprint, "cat")
    assert bench.counted() == {"published": 1}
    assert announced == [("cat", "cat.png", 832, 480)]
    assert {"decode", "encode", "publish"} <= set(outcome.timings)
    for stage in outcome.timings:
        assert bench.sample("sinkwatch_stage_duration_seconds_count", stage=stage) == 1, stage
    for histogram in ("energy_before_ratio", "energy_after_ratio", "mask_coverage_ratio"):
        assert bench.sample(f"sinkwatch_{histogram}_count") == 1, histogram
    assert bench.sample("sinkwatch_mask_coverage_ratio_sum") == pytest.approx(outcome.scores["mask_coverage"])
    assert bench.sample("sinkwatch_last_publish_timestamp_seconds") == outcome.finished_at
    assert bench.sample("sinkwatch_publish_latency_seconds_count") == 1
    assert bench.sample("sinkwatch_publish_latency_seconds_sum") == pytest.approx(2.5)


def test_the_upload_is_owed_before_the_ledger_calls_the_source_published(bench: Bench) -> None:
    # A crash between the two then leaves the row in "processing": recovery settles it and owes the
    # upload again. In the other order a crash between them loses the upload for good.
    source = bench.photo("cat.png")
    states: list[str] = []
    bench.outcomes.on_published = lambda *_upload: states.append(bench.entry("cat.png").state)
    bench.run(source)
    assert states == ["processing"]
    assert bench.entry("cat.png").state == "published"


@pytest.mark.parametrize(("seen", "observed"), [(None, 0), ("after", 1)])
def test_latency_is_measured_only_from_a_known_time_and_never_below_zero(
    bench: Bench, seen: str | None, observed: int
) -> None:
    job = bench.start(bench.photo("cat.png"))
    outcome = process_job(job)
    bench.outcomes.handle(job, outcome, seen_at=None if seen is None else outcome.finished_at + 60.0)
    assert bench.sample("sinkwatch_publish_latency_seconds_count") == observed
    assert bench.sample("sinkwatch_publish_latency_seconds_sum") == 0.0


def test_the_same_content_under_a_new_mtime_is_skipped_and_keeps_its_outputs(bench: Bench) -> None:
    source = bench.photo("cat.png")
    published = bench.run(source)
    frame = Publisher(bench.queue).frame_path("cat")
    before = frame.stat().st_mtime_ns
    st = source.stat()
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a touch, or a copy over it

    announced: list[object] = []
    bench.outcomes.on_published = lambda *args: announced.append(args)
    assert bench.run(source).status == "skipped"
    entry = bench.entry("cat.png")
    assert (entry.state, entry.sha256, entry.mtime_ns) == ("published", published.sha256, st.st_mtime_ns + 10**9)
    assert frame.stat().st_mtime_ns == before, "the frame was written again"
    assert bench.counted() == {"published": 1, "skipped": 1}
    assert announced == []


def test_a_skip_after_a_rule_change_counts_for_the_rule_that_made_the_outputs(bench: Bench) -> None:
    source = bench.photo("cat.png")
    bench.run(source)
    made = bench.rule.name
    bench.rule = load_rules(None).get("strong")  # a rule now matches it that made nothing
    st = source.stat()
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    assert bench.run(source).status == "skipped"
    assert bench.entry("cat.png").rule == made
    assert bench.sample("sinkwatch_images_processed_total", rule=made, outcome="skipped") == 1
    assert bench.sample("sinkwatch_images_processed_total", rule="strong", outcome="skipped") in (None, 0)


def test_a_source_gone_before_it_was_read_is_forgotten_but_keeps_its_name(bench: Bench) -> None:
    source = bench.photo("cat.png")
    job = bench.start(source)
    source.unlink()
    outcome = process_job(job)
    bench.outcomes.handle(job, outcome, seen_at=None)
    assert (outcome.status, outcome.sha256) == ("skipped", None)
    assert bench.ledger.get("cat.png") is None
    assert bench.counted() == {}
    assert bench.ledger.name_for("cat.png", "other", exists=lambda _name: False) == job.name


# --- retried and rejected -----------------------------------------------------------------------


def test_a_transient_failure_is_retried_with_doubling_delays_then_rejected(bench: Bench) -> None:
    source = bench.photo("cat.png", cut=5000)
    for attempt in range(1, MAX_ATTEMPTS):
        assert bench.run(source).status == "retry"
        entry = bench.entry("cat.png")
        assert (entry.state, entry.reason, entry.attempts) == ("retry", "incomplete", attempt)
        assert entry.next_attempt == NOW + RETRY_BASE * 2 ** (attempt - 1)
    assert not bench.queue.exists(), "a retried source left a reject record"

    bench.run(source)
    entry = bench.entry("cat.png")
    assert (entry.state, entry.reason, entry.next_attempt) == ("rejected", "incomplete", None)
    assert entry.message is not None and entry.message.endswith(f"(gave up after {MAX_ATTEMPTS} attempts)")
    record = bench.reject_record("cat")
    assert (record["error"], record["reason"], record["message"]) == ("IncompleteImage", "incomplete", entry.message)
    assert (record["key"], record["source"], record["rule"]) == ("cat.png", str(source), "default")
    assert bench.counted() == {"retried": MAX_ATTEMPTS - 1, "rejected": 1}
    assert bench.sample("sinkwatch_rejections_total", reason="incomplete") == 1
    # Not hashed: which bytes the worker found cut short (or could not read at all) nobody knows now.
    assert entry.sha256 is None


@pytest.fixture
def said() -> Iterator[list[tuple[str, str]]]:
    """(level, message) of each line logged at INFO or above while the test runs."""
    lines: list[tuple[str, str]] = []
    handler = logger.add(lambda m: lines.append((m.record["level"].name, m.record["message"])), level="INFO")
    yield lines
    logger.remove(handler)


def test_a_retry_under_a_second_away_is_not_said_to_be_0s_away(bench: Bench, said: list[tuple[str, str]]) -> None:
    bench.outcomes.retry_base = 0.2
    source = bench.photo("cat.png", cut=5000)
    for _ in range(2):
        assert bench.run(source).status == "retry"
    retries = [(level, line.split(": ")[0]) for level, line in said if line.startswith("retrying cat.png")]
    # Cut short at the first try, a file is being written still; the same file cut short again is news.
    assert retries == [
        ("INFO", "retrying cat.png in 0.2s (attempt 1)"),
        ("WARNING", "retrying cat.png in 0.4s (attempt 2)"),
    ]


def test_text_left_out_of_a_published_source_is_said_once_as_a_warning(
    bench: Bench, said: list[tuple[str, str]]
) -> None:
    info = PngInfo()
    info.add_text("prompt", "{}")
    info.add_text("workflow", "x" * (TEXT_VALUE_LIMIT + 1))
    source = bench.watch / "big.png"
    with Image.open(photo_file("chelsea")) as photo:
        photo.save(source, pnginfo=info)
    assert bench.run(source).status == "published"
    assert [line for level, line in said if level == "WARNING"] == [
        "big.png: PNG text 'workflow' left out of the sidecar and the frame: over 4 Mi characters each or 8 Mi in all"
    ]


def test_a_permanent_failure_is_rejected_at_once(bench: Bench) -> None:
    source = bench.watch / "notes.png"
    source.write_text("not an image", encoding="utf-8")
    assert bench.run(source).status == "rejected"
    entry = bench.entry("notes.png")
    st = source.stat()
    assert (entry.state, entry.reason, entry.attempts) == ("rejected", "not_image", 1)
    assert (entry.size, entry.mtime_ns) == (st.st_size, st.st_mtime_ns)
    record = bench.reject_record("notes")
    assert (record["reason"], record["key"], record["source"], record["rule"]) == (
        "not_image",
        "notes.png",
        str(source),
        "default",
    )
    assert bench.counted() == {"rejected": 1}
    assert bench.sample("sinkwatch_rejections_total", reason="not_image") == 1


def test_a_failed_publish_is_retried_past_max_attempts_with_a_capped_delay(bench: Bench, tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the queue folder should be", encoding="utf-8")
    source = bench.photo("cat.png")
    delays: list[float] = []
    for _attempt in range(MAX_ATTEMPTS + 3):
        assert bench.run(source, queue=blocked).status == "retry"
        entry = bench.entry("cat.png")
        assert (entry.state, entry.reason) == ("retry", "publish")
        assert entry.next_attempt is not None
        delays.append(entry.next_attempt - NOW)
    assert delays == [10.0, 20.0, 40.0, 80.0, 160.0, MAX_PUBLISH_RETRY_DELAY]
    assert bench.counted() == {"retried": MAX_ATTEMPTS + 3}
    assert bench.sample("sinkwatch_publish_errors_total", reason="other") == MAX_ATTEMPTS + 3
    assert not bench.queue.exists()


def test_a_reject_record_that_cannot_be_written_is_retried_not_lost(bench: Bench) -> None:
    source = bench.watch / "notes.png"
    source.write_text("not an image", encoding="utf-8")
    bench.queue.write_text("a file where the queue folder should be", encoding="utf-8")
    assert bench.run(source).status == "rejected"
    entry = bench.entry("notes.png")
    assert (entry.state, entry.reason, entry.next_attempt) == ("retry", "publish", NOW + RETRY_BASE)
    assert bench.counted() == {"retried": 1}
    assert bench.sample("sinkwatch_publish_errors_total", reason="other") == 1
    assert bench.sample("sinkwatch_rejections_total", reason="not_image") == 0

    bench.queue.unlink()  # the queue is back: the retry writes the record
    bench.run(source)
    assert bench.entry("notes.png").state == "rejected"
    assert bench.reject_record("notes")["reason"] == "not_image"
    assert bench.counted() == {"retried": 1, "rejected": 1}


# --- worker died --------------------------------------------------------------------------------


def test_a_worker_dying_is_tried_again_then_rejected_as_crashed(bench: Bench) -> None:
    source = bench.photo("cat.png")
    for attempt in range(1, MAX_ATTEMPTS):
        assert bench.outcomes.worker_died(bench.start(source), alone=True) is True, attempt
        entry = bench.entry("cat.png")
        assert (entry.state, entry.reason, entry.attempts, entry.next_attempt) == ("retry", "crashed", attempt, NOW)
    assert bench.counted() == {"retried": MAX_ATTEMPTS - 1} and not bench.queue.exists()

    assert bench.outcomes.worker_died(bench.start(source), alone=True) is False
    entry = bench.entry("cat.png")
    st = source.stat()
    assert (entry.state, entry.reason, entry.attempts) == ("rejected", "crashed", MAX_ATTEMPTS)
    assert (entry.size, entry.mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert entry.sha256 == sha256_file(source), "hashed: the same bytes, touched, are not run again"
    assert entry.message == f"a worker process died on this image (attempt {MAX_ATTEMPTS} of {MAX_ATTEMPTS})"
    record = bench.reject_record("cat")
    assert (record["error"], record["reason"], record["transient"]) == ("WorkerCrashed", "crashed", False)
    assert (record["key"], record["source"], record["rule"]) == ("cat.png", str(source), "default")
    assert bench.counted() == {"retried": MAX_ATTEMPTS - 1, "rejected": 1}
    assert bench.sample("sinkwatch_rejections_total", reason="crashed") == 1


def test_an_image_rewritten_since_its_attempt_began_is_not_hashed_when_a_worker_death_rejects_it(bench: Bench) -> None:
    """Its writer finished after the worker read it: the bytes there now are another image, which a touch must
    still be able to have processed."""
    source = bench.photo("cat.png")
    for _attempt in range(1, MAX_ATTEMPTS):
        assert bench.outcomes.worker_died(bench.start(source), alone=True) is True
    job = bench.start(source)
    with source.open("ab") as more:
        more.write(b"the writer was not done")
    assert bench.outcomes.worker_died(job, alone=True) is False
    entry = bench.entry("cat.png")
    assert (entry.state, entry.reason, entry.sha256) == ("rejected", "crashed", None)


def test_a_stop_before_the_retry_of_an_image_that_killed_its_worker_leaves_that_crash_counted(bench: Bench) -> None:
    """Recovery gives back attempts a killed daemon cut short, not a crash (systemd's OOMPolicy=stop: the OOM
    killer takes the worker, systemd stops the daemon before it retried the image, and starts it again)."""
    source = bench.photo("cat.png")
    requeued: list[str] = []
    for attempt in range(1, MAX_ATTEMPTS):
        assert bench.outcomes.worker_died(bench.start(source), alone=True) is True, attempt
        recover(
            bench.ledger,
            Publisher(bench.queue),
            resolve=bench.watch.joinpath,
            requeue=lambda e, _p, _a: requeued.append(e.relpath),
        )
        assert requeued == [] and bench.entry("cat.png").attempts == attempt, "the crash was given back"

    assert bench.outcomes.worker_died(bench.start(source), alone=True) is False
    assert bench.entry("cat.png").state == "rejected"


def test_a_worker_dying_on_a_source_the_ledger_lost_counts_as_a_first_attempt(bench: Bench) -> None:
    job = bench.start(bench.photo("cat.png"))
    bench.ledger.forget("cat.png")
    assert bench.outcomes.worker_died(job, alone=True) is True
    assert bench.ledger.get("cat.png") is None and bench.counted() == {"retried": 1}


def test_a_bystander_of_a_worker_death_is_never_rejected_for_it(bench: Bench) -> None:
    """Not alone in flight, a job may only have shared the dead worker's pool: no amount of that rejects it."""
    source = bench.photo("cat.png")
    for attempt in range(1, 2 * MAX_ATTEMPTS):
        assert bench.outcomes.worker_died(bench.start(source), alone=False) is True, attempt
    entry = bench.entry("cat.png")
    assert (entry.state, entry.attempts) == ("retry", 0), "the others' crashes were counted as its attempts"
    assert bench.counted() == {"retried": 2 * MAX_ATTEMPTS - 1} and not bench.queue.exists()
    # Nor do they bring its own first crash closer to the limit.
    assert bench.outcomes.worker_died(bench.start(source), alone=True) is True
    assert bench.entry("cat.png").attempts == 1
