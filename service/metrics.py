"""Every Prometheus metric sinkwatch exports, defined in this one module.

A :class:`Metrics` is created against a registry passed in: the daemon passes
the one its HTTP listener serves, tests pass a fresh ``CollectorRegistry``.
Names follow the Prometheus conventions (``sinkwatch_`` prefix, base units:
seconds and ratios, ``_total`` counters); labels are low-cardinality slugs
(rule names, stages, outcomes, reasons), never file names. Every known label
value is pre-initialised to 0 so that ``rate()`` and alerts see a series from
the first scrape instead of an absent one.

Worker processes never touch these objects: every result travels back to the
parent process over the pool's result queue and the parent records all of it.
One process owns all counts, so prometheus_client's multiprocess mode (and its
mmap files and lost counts on crashes) is not needed.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)

from service import __version__
from service.errors import REJECT_REASONS
from service.ledger_uploads import JOB_ENDS

SOURCES = ("event", "scan", "startup")
OUTCOMES = ("published", "rejected", "retried", "skipped", "ignored")
STAGES = ("decode", "resize", "analysis", "blur", "heatmap", "scores", "encode", "publish")
PUBLISH_ERROR_REASONS = ("no_space", "permission", "read_only", "other")
# "gone": the frame left the queue (cleared, replaced) before it could be sent, no fault of ComfyUI's.
UPLOAD_OUTCOMES = ("ok", "failed", "retried", "gone")
PROMPT_OUTCOMES = ("queued", "rejected", "failed", "retried")

# fmt: off
# One stage costs tens of milliseconds (decode ~30 ms, resize ~6 ms, encode
# ~25 ms); buckets are dense there and still tell 1 ms from 2 s.
STAGE_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
    0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0,
)
# File close -> frame published includes the settle delay (1 s by default for
# created/moved files, timed from their last change) and the wait in the queue
# under a burst.
LATENCY_BUCKETS = (
    0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)
# Matrix Vision energy and mask coverage live on a fixed 0..1 scale; typical
# values sit low, so the low end is finer.
RATIO_BUCKETS = (
    0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0,
)
# fmt: on

_ERRNO_REASONS = {
    errno.ENOSPC: "no_space",
    errno.EDQUOT: "no_space",
    errno.EACCES: "permission",
    errno.EPERM: "permission",
    errno.EROFS: "read_only",
}


class Metrics:
    """The sinkwatch metrics, registered on ``registry`` (a fresh one when None)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, rules: Iterable[str] = ("default",)) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry

        self.discovered = Counter(
            "sinkwatch_images_discovered_total",
            "Source images found, by how they were found.",
            ["source"],
            registry=reg,
        )
        self.processed = Counter(
            "sinkwatch_images_processed_total",
            "Source images handled, by rule and outcome.",
            ["rule", "outcome"],
            registry=reg,
        )
        self.rejected = Counter(
            "sinkwatch_rejections_total",
            "Source images rejected for good, by reason.",
            ["reason"],
            registry=reg,
        )
        self.stage_seconds = Histogram(
            "sinkwatch_stage_duration_seconds",
            "Time one image spends in one pipeline stage.",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=reg,
        )
        self.latency_seconds = Histogram(
            "sinkwatch_publish_latency_seconds",
            "Time from the source file being closed (created or moved in: last changed) to its cleaned frame "
            "being published, settle delay included.",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.queue_depth = Gauge("sinkwatch_queue_depth", "Images waiting in the work queue.", registry=reg)
        self.in_flight = Gauge(
            "sinkwatch_in_flight",
            "Images handed to the workers: being processed, or next in line for a worker (at most 2 per worker).",
            registry=reg,
        )
        self.retries_waiting = Gauge(
            "sinkwatch_retries_waiting",
            "Sources waiting for a retry: a file still being written, a full or read-only queue, a worker crash.",
            registry=reg,
        )
        self.workers = Gauge(
            "sinkwatch_workers", "Worker processes configured (--workers); a dead one is replaced.", registry=reg
        )
        self.energy_before = Histogram(
            "sinkwatch_energy_before_ratio",
            "Mean high-frequency (Matrix Vision) energy of a frame before cleaning, 0..1.",
            buckets=RATIO_BUCKETS,
            registry=reg,
        )
        self.energy_after = Histogram(
            "sinkwatch_energy_after_ratio",
            "Mean high-frequency (Matrix Vision) energy of a frame after cleaning, 0..1.",
            buckets=RATIO_BUCKETS,
            registry=reg,
        )
        self.mask_coverage = Histogram(
            "sinkwatch_mask_coverage_ratio",
            "Share of the frame covered by the sink mask (blurred), 0..1.",
            buckets=RATIO_BUCKETS,
            registry=reg,
        )
        self.last_publish = Gauge(
            "sinkwatch_last_publish_timestamp_seconds",
            "Unix time of the last published frame (0: none since start).",
            registry=reg,
        )
        self.rules_loaded = Gauge("sinkwatch_rules_loaded", "Rules in force.", registry=reg)
        self.rule_reload_failures = Counter(
            "sinkwatch_rule_reload_failures_total",
            "Rule reloads that failed; the last good rules stayed in force.",
            registry=reg,
        )
        self.rules_reload_ok = Gauge(
            "sinkwatch_rules_last_reload_successful",
            "1 if the last load of the rules succeeded; 0 while the rules folder is broken (the last good rules "
            "stay in force).",
            registry=reg,
        )
        self.watcher_up = Gauge("sinkwatch_watcher_up", "1 while the folder observer is alive, else 0.", registry=reg)
        self.ledger_writable = Gauge(
            "sinkwatch_ledger_writable",
            "1 while the ledger records progress; 0 while its disk is full or read-only (no image is processed).",
            registry=reg,
        )
        self.passed_over = Counter(
            "sinkwatch_files_passed_over_total",
            "Files in the watch folder not taken for what they are (a link leading outside it or nowhere, a FIFO, "
            "a device), each counted once, when first seen; the log names them.",
            registry=reg,
        )
        self.watcher_restarts = Counter(
            "sinkwatch_watcher_restarts_total",
            "Times a dead folder observer was restarted.",
            registry=reg,
        )
        self.publish_errors = Counter(
            "sinkwatch_publish_errors_total",
            "Failed attempts to write into the queue folder (retried), by reason.",
            ["reason"],
            registry=reg,
        )
        self.frames_renamed = Counter(
            "sinkwatch_frames_renamed_total",
            "Sources moved from the output name they had to a new one because a file sinkwatch did not write "
            "(a user's edit, their own image, a link), or the frame of another image once at their path, sat "
            "at theirs; that file was left as it is. A name taken before a source's first frame is not counted.",
            registry=reg,
        )
        self.comfyui_uploads = Counter(
            "sinkwatch_comfyui_uploads_total",
            "Uploads of cleaned frames to a remote ComfyUI, by outcome.",
            ["outcome"],
            registry=reg,
        )
        self.comfyui_prompts = Counter(
            "sinkwatch_comfyui_prompts_total",
            "I2V workflows queued on ComfyUI, by outcome.",
            ["outcome"],
            registry=reg,
        )
        self.comfyui_jobs = Counter(
            "sinkwatch_comfyui_jobs_total",
            "Video jobs queued on ComfyUI that were seen to end, by how they ended.",
            ["outcome"],
            registry=reg,
        )
        self.comfyui_pending_uploads = Gauge(
            "sinkwatch_comfyui_pending_uploads",
            "Uploads to a remote ComfyUI the ledger holds as pending (owed, not sent yet).",
            registry=reg,
        )
        # sinkwatch_comfyui_up appears at the first answer or failure (set_comfyui_up): before that, and without a
        # remote ComfyUI at all, nothing is known, and a 0 would page someone for a ComfyUI never talked to.
        self.comfyui_up: Gauge | None = None
        self.build_info = Info("sinkwatch_build", "Version and fingerprint of the rules in force.", registry=reg)

        # The default registry already carries these collectors.
        if reg is not REGISTRY:
            ProcessCollector(registry=reg)
            PlatformCollector(registry=reg)
            GCCollector(registry=reg)

        for source in SOURCES:
            self.discovered.labels(source)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        for stage in STAGES:
            self.stage_seconds.labels(stage)
        for reason in PUBLISH_ERROR_REASONS:
            self.publish_errors.labels(reason)
        for outcome in UPLOAD_OUTCOMES:
            self.comfyui_uploads.labels(outcome)
        for outcome in PROMPT_OUTCOMES:
            self.comfyui_prompts.labels(outcome)
        for outcome in JOB_ENDS:
            self.comfyui_jobs.labels(outcome)
        for name in rules:
            self.add_rule(name)
        self.set_build_info(__version__, "none")

    def add_rule(self, name: str) -> None:
        """Pre-initialise a newly loaded rule's series (counters of removed rules stay)."""
        for outcome in OUTCOMES:
            self.processed.labels(name, outcome)

    def set_build_info(self, version: str, rules_fingerprint: str) -> None:
        """Replace ``sinkwatch_build_info`` (one series at any time), e.g. on rule reload."""
        self.build_info.info({"version": version, "rules_fingerprint": rules_fingerprint})

    def set_comfyui_up(self, up: bool) -> None:
        """Whether the remote ComfyUI answered the last request; exports ``sinkwatch_comfyui_up`` from the first."""
        if self.comfyui_up is None:
            self.comfyui_up = Gauge(
                "sinkwatch_comfyui_up",
                "1 while the remote ComfyUI answers, 0 while it is down; absent before the first request.",
                registry=self.registry,
            )
        self.comfyui_up.set(1 if up else 0)

    def record_publish_error(self, error: BaseException) -> None:
        """Count a failed write into the queue by a fixed reason taken from its errno."""
        self.publish_errors.labels(publish_error_reason(error)).inc()


def publish_error_reason(error: BaseException) -> str:
    """The reason slug of a publish failure: the first ``OSError`` in its cause chain decides."""
    chain: list[BaseException] = []
    link: BaseException | None = error
    while link is not None and link not in chain:  # a context chain may loop
        chain.append(link)
        if isinstance(link, OSError) and link.errno in _ERRNO_REASONS:
            return _ERRNO_REASONS[link.errno]
        link = link.__cause__ or link.__context__
    return "other"
