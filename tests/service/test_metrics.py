"""service.metrics: names, pre-initialised labels, helpers, and promtool's lint."""

from __future__ import annotations

import errno
import re
import shutil
import subprocess

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.metrics import MetricWrapperBase

from service.errors import REJECT_REASONS, PublishError
from service.metrics import (
    OUTCOMES,
    PROMPT_OUTCOMES,
    PUBLISH_ERROR_REASONS,
    SOURCES,
    STAGE_BUCKETS,
    STAGES,
    UPLOAD_OUTCOMES,
    Metrics,
    publish_error_reason,
)

# Label names a sinkwatch series may carry: all bounded slugs, never a path.
ALLOWED_LABELS = {"source", "rule", "outcome", "reason", "stage", "le", "version", "rules_fingerprint"}
# What a label value may be: a short lower-case slug (rule names are validated the same way), never a path.
SLUG = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install the 'prometheus' package (apt-get install prometheus; .ci/run does)")
    return path


def test_known_label_values_start_at_zero(registry: CollectorRegistry) -> None:
    Metrics(registry, rules=("default", "wan22-720p"))
    for source in SOURCES:
        assert value(registry, "sinkwatch_images_discovered_total", source=source) == 0
    for rule in ("default", "wan22-720p"):
        for outcome in OUTCOMES:
            assert value(registry, "sinkwatch_images_processed_total", rule=rule, outcome=outcome) == 0
    for reason in REJECT_REASONS:
        assert value(registry, "sinkwatch_rejections_total", reason=reason) == 0
    for stage in STAGES:
        assert value(registry, "sinkwatch_stage_duration_seconds_count", stage=stage) == 0
    for reason in PUBLISH_ERROR_REASONS:
        assert value(registry, "sinkwatch_publish_errors_total", reason=reason) == 0
    for outcome in UPLOAD_OUTCOMES:
        assert value(registry, "sinkwatch_comfyui_uploads_total", outcome=outcome) == 0
    for outcome in PROMPT_OUTCOMES:
        assert value(registry, "sinkwatch_comfyui_prompts_total", outcome=outcome) == 0
    for name in (
        "sinkwatch_publish_latency_seconds_count",
        "sinkwatch_energy_before_ratio_count",
        "sinkwatch_energy_after_ratio_count",
        "sinkwatch_mask_coverage_ratio_count",
        "sinkwatch_queue_depth",
        "sinkwatch_in_flight",
        "sinkwatch_workers",
        "sinkwatch_last_publish_timestamp_seconds",
        "sinkwatch_rules_loaded",
        "sinkwatch_rule_reload_failures_total",
        "sinkwatch_watcher_up",
        "sinkwatch_watcher_restarts_total",
        "sinkwatch_frames_renamed_total",
    ):
        assert value(registry, name) == 0, name


def test_process_and_platform_collectors_are_on_the_registry(registry: CollectorRegistry) -> None:
    Metrics(registry)
    assert value(registry, "process_start_time_seconds") is not None
    assert value(registry, "process_resident_memory_bytes") is not None
    names = {family.name for family in registry.collect()}
    assert "python_info" in names


def test_default_is_a_fresh_registry_never_the_global_one() -> None:
    first, second = Metrics(), Metrics()
    assert first.registry is not second.registry
    assert first.registry is not REGISTRY
    assert REGISTRY.get_sample_value("sinkwatch_workers") is None


def test_the_global_registry_works_when_passed() -> None:
    metrics = Metrics(REGISTRY)  # must not register the process collector twice
    try:
        metrics.workers.set(3)
        assert REGISTRY.get_sample_value("sinkwatch_workers") == 3
    finally:
        for attribute in vars(metrics).values():
            if isinstance(attribute, MetricWrapperBase):
                REGISTRY.unregister(attribute)
    assert REGISTRY.get_sample_value("sinkwatch_workers") is None


def test_one_registry_holds_one_metrics(registry: CollectorRegistry) -> None:
    Metrics(registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Metrics(registry)


def test_labels_are_bounded_slugs(registry: CollectorRegistry) -> None:
    Metrics(registry)
    for family in registry.collect():
        if not family.name.startswith("sinkwatch_"):
            continue
        for sample in family.samples:
            assert set(sample.labels) <= ALLOWED_LABELS, sample
            for label, value in sample.labels.items():
                if label not in ("le", "version"):  # bucket bounds and the package version are not slugs
                    assert SLUG.fullmatch(value), f"{family.name}{{{label}={value!r}}} is not a bounded slug"


def test_add_rule_pre_initialises_its_outcomes(registry: CollectorRegistry) -> None:
    metrics = Metrics(registry)
    assert value(registry, "sinkwatch_images_processed_total", rule="portrait", outcome="published") is None
    metrics.add_rule("portrait")
    for outcome in OUTCOMES:
        assert value(registry, "sinkwatch_images_processed_total", rule="portrait", outcome=outcome) == 0


def test_observations_land_in_their_buckets(registry: CollectorRegistry) -> None:
    metrics = Metrics(registry)
    metrics.stage_seconds.labels(stage="decode").observe(0.03)
    metrics.stage_seconds.labels(stage="decode").observe(0.02)
    metrics.latency_seconds.observe(1.25)
    metrics.energy_before.observe(0.2)
    metrics.energy_after.observe(0.05)
    metrics.mask_coverage.observe(0.3)
    metrics.last_publish.set(1_700_000_005.0)
    assert value(registry, "sinkwatch_stage_duration_seconds_count", stage="decode") == 2
    assert value(registry, "sinkwatch_stage_duration_seconds_sum", stage="decode") == pytest.approx(0.05)
    assert value(registry, "sinkwatch_stage_duration_seconds_bucket", stage="decode", le="0.025") == 1
    assert value(registry, "sinkwatch_stage_duration_seconds_bucket", stage="decode", le="0.03") == 2
    assert value(registry, "sinkwatch_stage_duration_seconds_count", stage="blur") == 0
    assert value(registry, "sinkwatch_publish_latency_seconds_bucket", le="1.0") == 0
    assert value(registry, "sinkwatch_publish_latency_seconds_bucket", le="1.5") == 1
    assert value(registry, "sinkwatch_energy_before_ratio_bucket", le="0.2") == 1
    assert value(registry, "sinkwatch_energy_after_ratio_bucket", le="0.03") == 0
    assert value(registry, "sinkwatch_energy_after_ratio_bucket", le="0.05") == 1
    assert value(registry, "sinkwatch_mask_coverage_ratio_bucket", le="1.0") == 1
    assert value(registry, "sinkwatch_last_publish_timestamp_seconds") == 1_700_000_005.0


def test_build_info_is_replaced_not_accumulated(registry: CollectorRegistry) -> None:
    metrics = Metrics(registry)
    metrics.set_build_info("1.2.3", "aaaa")
    metrics.set_build_info("1.2.3", "bbbb")
    assert value(registry, "sinkwatch_build_info", version="1.2.3", rules_fingerprint="bbbb") == 1
    assert value(registry, "sinkwatch_build_info", version="1.2.3", rules_fingerprint="aaaa") is None
    series = [s for f in registry.collect() for s in f.samples if s.name == "sinkwatch_build_info"]
    assert len(series) == 1


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "no_space"),
        (PermissionError(errno.EACCES, "Permission denied"), "permission"),
        (OSError(errno.EROFS, "Read-only file system"), "read_only"),
        (OSError(errno.EIO, "Input/output error"), "other"),
        (PublishError("rename failed"), "other"),
    ],
)
def test_publish_error_reason_from_errno(error: BaseException, reason: str) -> None:
    assert publish_error_reason(error) == reason


def test_publish_error_reason_follows_the_cause(registry: CollectorRegistry) -> None:
    metrics = Metrics(registry)
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise PublishError("cannot write frame", path="q/x.png") from exc
    except PublishError as wrapped:
        metrics.record_publish_error(wrapped)
    assert value(registry, "sinkwatch_publish_errors_total", reason="no_space") == 1
    assert value(registry, "sinkwatch_publish_errors_total", reason="other") == 0


def test_stage_buckets_suit_tens_of_milliseconds() -> None:
    assert STAGE_BUCKETS[0] <= 0.001 and STAGE_BUCKETS[-1] >= 2.0
    assert list(STAGE_BUCKETS) == sorted(set(STAGE_BUCKETS))
    assert len([b for b in STAGE_BUCKETS if 0.01 <= b <= 0.1]) >= 8


def test_exposition_passes_promtool_lint(registry: CollectorRegistry) -> None:
    metrics = Metrics(registry, rules=("default", "wan21-480p"))
    for stage in STAGES:
        metrics.stage_seconds.labels(stage=stage).observe(0.01)
    metrics.processed.labels(rule="default", outcome="published").inc()
    metrics.processed.labels(rule="wan21-480p", outcome="rejected").inc()
    metrics.rejected.labels(reason="corrupt").inc()
    metrics.mask_coverage.observe(0.3)
    metrics.set_build_info("0.1.0", "0123abcd")
    text = generate_latest(registry)
    done = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stderr == b"", done.stderr.decode()
    assert b'sinkwatch_images_processed_total{outcome="published",rule="default"} 1.0' in text


def test_the_workers_gauge_says_it_is_the_configured_count(registry: CollectorRegistry) -> None:
    # It is set once from --workers; a worker killed and not yet replaced does not lower it.
    Metrics(registry)
    (family,) = [family for family in registry.collect() if family.name == "sinkwatch_workers"]
    assert "configured" in family.documentation and "alive" not in family.documentation


def test_the_latency_help_says_it_includes_the_settle_delay(registry: CollectorRegistry) -> None:
    Metrics(registry)
    (family,) = [family for family in registry.collect() if family.name == "sinkwatch_publish_latency_seconds"]
    assert "settle delay included" in family.documentation
