"""What a codec prints to stderr in a worker comes back with the job's outcome and is logged about that source.

libpng warns on stderr about a grey PNG carrying an RGB ICC profile (what some editors leave after a
desaturation): in a real worker process, that line must not reach the daemon's JSON log as bare text.
"""

from __future__ import annotations

import io
import json
import os
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from service import pool
from service.codec_messages import MAX_LINE, MAX_LINES, CodecMessages
from service.ledger import Ledger
from service.logs import configure_logging
from service.metrics import Metrics
from service.outcomes import Outcomes
from service.pool import WorkerPool
from service.publish import Publisher
from service.rules import load_rules
from service.runner import Job
from tests.conftest import load_photo


def test_what_is_printed_on_fd_2_during_a_call_is_returned_and_stderr_is_restored_after(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    messages = CodecMessages(tmp_path)
    result, said = messages.run(lambda: os.write(2, b"libpng warning: iCCP: known incorrect sRGB profile\n\n") and 7)
    assert (result, said) == (7, ("libpng warning: iCCP: known incorrect sRGB profile",))
    assert messages.run(lambda: None) == (None, ()), "the last call's lines are not said again"
    os.write(2, b"after the call\n")
    assert capfd.readouterr().err == "after the call\n"


def test_a_call_that_raises_leaves_nothing_for_the_next(tmp_path: Path) -> None:
    messages = CodecMessages(tmp_path)

    def fail() -> None:
        os.write(2, b"warning before the failure\n")
        raise SystemExit(3)

    with pytest.raises(SystemExit):
        messages.run(fail)
    assert messages.run(lambda: None) == (None, ())


def test_a_flood_of_lines_is_cut_to_the_first_ones(tmp_path: Path) -> None:
    flood = b"".join(b"warning %d\n" % n for n in range(20000))
    _, said = CodecMessages(tmp_path).run(lambda: os.write(2, flood))
    assert said[:2] == ("warning 0", "warning 1") and len(said) == MAX_LINES + 1
    assert said[-1] == f"... {len(flood)} bytes in all"


def _print_then_die() -> None:
    """In a worker: a codec warns, then kills the process (a segfault, the OOM killer)."""

    def codec() -> None:
        os.write(2, b"codec: fatal oddity, about to die\n")
        os.kill(os.getpid(), 9)

    assert pool._codec_messages is not None
    pool._codec_messages.run(codec)


def test_what_a_worker_printed_before_it_died_mid_job_is_handed_over_when_the_pool_is_replaced() -> None:
    workers = WorkerPool(1)
    try:
        with pytest.raises(BrokenProcessPool):
            workers._executor.submit(_print_then_die).result(timeout=120)
        said = workers.replace()
        assert list(said.values()) == [("codec: fatal oddity, about to die",)]
        assert workers.replace() == {}, "said once"
    finally:
        workers.close()
    assert not workers.spool.exists()


def test_a_worker_keeps_what_libpng_printed_and_the_daemon_logs_it_about_the_source(
    tmp_path: Path, metrics: Metrics, restored_logging: None
) -> None:
    grey = np.ascontiguousarray(load_photo("astronaut")[::2, ::2, 1])
    source = tmp_path / "grey with an RGB profile.png"
    Image.fromarray(grey).save(source, icc_profile=ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    rule = load_rules(None).get("default")
    job = Job(source=source, key=source.name, name="grey", rule=rule, queue=tmp_path / "queue",
              max_bytes=1 << 30, max_pixels=1 << 30)  # fmt: skip
    pool = WorkerPool(1)
    try:
        outcome = pool.submit(job).result(timeout=120)
    finally:
        pool.close()
    assert outcome.status == "published"
    assert any("iCCP" in line and line.startswith("libpng warning") for line in outcome.codec_messages), outcome

    stream = io.StringIO()
    configure_logging(log_format="json", stream=stream)
    with Ledger(tmp_path / "ledger.sqlite3") as ledger:
        ledger.start(job.key, size=1, mtime_ns=1, sha256=None, rule=rule.name, fingerprint=rule.fingerprint)
        Outcomes(ledger=ledger, publisher=Publisher(job.queue), metrics=metrics, max_attempts=3, retry_base=1.0).handle(
            job, outcome, seen_at=None
        )
    records = [json.loads(line)["record"] for line in stream.getvalue().splitlines()]
    [said] = [r for r in records if "the codec said" in r["message"]]
    assert said["level"]["name"] == "WARNING" and said["extra"]["source"] == source.name
    assert "iCCP" in said["message"]


def test_lines_beyond_what_is_read_are_summed_up_by_the_size(tmp_path: Path) -> None:
    long_lines = b"x" * 40000 + b"\n" + b"y" * 40000 + b"\n"
    _, said = CodecMessages(tmp_path).run(lambda: os.write(2, long_lines))
    assert said == ("x" * MAX_LINE + "...", "y" * MAX_LINE + "...", f"... {len(long_lines)} bytes in all")
