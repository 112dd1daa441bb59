"""deploy/: Prometheus config and alerts through the real promtool, the Grafana
dashboard against the metrics the service exports, the systemd unit, the Dockerfile."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from service import http
from service.metrics import Metrics
from service.settings import DEFAULT_METRICS_PORT, Settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
ALERTS = (
    "SinkwatchStalled",
    "SinkwatchRejectionRatioHigh",
    "SinkwatchWatcherDown",
    "SinkwatchRulesBroken",
    "SinkwatchLedgerPaused",
    "SinkwatchComfyUIDown",
    "SinkwatchComfyUIFailed",
    "SinkwatchComfyUIJobsFailed",
    "SinkwatchTargetDown",
)

# PromQL words that are neither metrics nor functions (functions are followed by "(").
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install the 'prometheus' package (apt-get install prometheus; .ci/run does)")
    return subprocess.run([path, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def exported_names() -> set[str]:
    """Every series name a fresh Metrics() registry exposes once it talked to a ComfyUI, plus Prometheus' own ``up``."""
    registry = CollectorRegistry()
    Metrics(registry).set_comfyui_up(True)
    return {sample.name for family in registry.collect() for sample in family.samples} | {"up"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = LABEL_LISTS.sub("", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", expr):
        if expr[match.end() :].lstrip().startswith("(") or match.group() in PROMQL_WORDS:
            continue
        names.add(match.group())
    return names


def dashboard() -> dict[str, object]:
    loaded: dict[str, object] = json.loads((DEPLOY / "grafana" / "sinkwatch.json").read_text())
    return loaded


def dashboard_exprs() -> list[str]:
    panels = dashboard()["panels"]
    assert isinstance(panels, list)
    return [target["expr"] for panel in panels for target in panel.get("targets", [])]


def alert_exprs() -> list[str]:
    """The ``expr:`` of each rule in alerts.yml (inline or a ``|`` block)."""
    exprs: list[str] = []
    lines = (PROMETHEUS / "alerts.yml").read_text().splitlines()
    for number, line in enumerate(lines):
        found = re.match(r"^(\s*)expr:\s*(.*)$", line)
        if not found:
            continue
        indent, value = len(found.group(1)), found.group(2)
        if value != "|":
            exprs.append(value)
            continue
        block = []
        for following in lines[number + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            block.append(following)
        exprs.append("\n".join(block))
    return exprs


# --- Prometheus -----------------------------------------------------------------


def test_promtool_check_config() -> None:
    done = promtool("check", "config", "prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_check_rules() -> None:
    done = promtool("check", "rules", "alerts.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(ALERTS)} rules found" in done.stdout


def test_promtool_test_rules() -> None:
    done = promtool("test", "rules", "alerts.test.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_is_tested_firing_and_quiet() -> None:
    rules = (PROMETHEUS / "alerts.yml").read_text()
    tests = (PROMETHEUS / "alerts.test.yml").read_text()
    for alert in ALERTS:
        assert f"- alert: {alert}\n" in rules
        quiet = re.search(rf"alertname: {alert}\n\s+exp_alerts: \[\]", tests)
        firing = re.search(rf"alertname: {alert}\n\s+exp_alerts:\n\s+- exp_labels:", tests)
        assert quiet and firing, f"{alert}: needs a case that fires and one that does not"


def test_alerts_use_only_exported_metrics() -> None:
    exprs = alert_exprs()
    assert len(exprs) == len(ALERTS)
    known = exported_names()
    for expr in exprs:
        assert metric_names(expr), expr
        assert metric_names(expr) <= known, (expr, metric_names(expr) - known)


def test_the_scrape_target_is_the_default_port() -> None:
    config = (PROMETHEUS / "prometheus.yml").read_text()
    assert "job_name: sinkwatch" in config  # the alerts select job="sinkwatch"
    assert f'targets: ["sinkwatch:{DEFAULT_METRICS_PORT}"]' in config


# --- Grafana ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (le) (rate(foo_seconds_bucket{a="b"}[$__rate_interval]))', {"foo_seconds_bucket"}),
        ("time() - max(x_timestamp) and max(x_timestamp) > 0", {"x_timestamp"}),
        ('histogram_quantile(0.95, sum by (le, stage) (rate(y_bucket{job=~"$job"}[5m])))', {"y_bucket"}),
        ("a_total / on (instance) group_left (version) b_info * 1e-9", {"a_total", "b_info"}),
    ],
)
def test_metric_name_parser(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_dashboard_queries_name_only_exported_metrics() -> None:
    known = exported_names()
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    used: set[str] = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= known, f"{expr!r} names unknown metrics {sorted(names - known)}"
        used |= names
    templating = dashboard()["templating"]
    assert isinstance(templating, dict)
    for variable in templating["list"]:
        if variable["type"] == "query":
            assert set(re.findall(r"label_values\((\w+)", variable["definition"])) <= known
    # What the issue asks the dashboard to show.
    for needed in (
        "sinkwatch_images_processed_total",
        "sinkwatch_publish_latency_seconds_bucket",
        "sinkwatch_rejections_total",
        "sinkwatch_mask_coverage_ratio_bucket",
        "sinkwatch_energy_before_ratio_bucket",
        "sinkwatch_energy_after_ratio_bucket",
        "sinkwatch_queue_depth",
        "sinkwatch_stage_duration_seconds_bucket",
    ):
        assert needed in used, f"dashboard does not show {needed}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # promtool parses recording rules; Grafana's interval variable needs a value.
    rules = ["groups:", "  - name: dashboard", "    rules:"]
    for number, expr in enumerate(dashboard_exprs()):
        promql = json.dumps(expr.replace("$__rate_interval", "5m"))
        rules += [f"      - record: dashboard:panel_{number}", f"        expr: {promql}"]
    (tmp_path / "dashboard.rules.yml").write_text("\n".join(rules) + "\n")
    done = promtool("check", "rules", "dashboard.rules.yml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] == "sinkwatch"
    panels = board["panels"]
    assert isinstance(panels, list)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_grafana_provisioning_matches_compose() -> None:
    compose = (DEPLOY / "docker" / "compose.yaml").read_text()
    provider = (DEPLOY / "grafana" / "provisioning" / "dashboards" / "sinkwatch.yml").read_text()
    datasource = (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    folder = re.search(r"path:\s*(\S+)", provider)
    assert folder, provider
    assert f"../grafana/sinkwatch.json:{folder.group(1)}/sinkwatch.json:ro" in compose
    assert "type: prometheus" in datasource and "url: http://prometheus:9090" in datasource


def test_compose_mounts_files_that_exist() -> None:
    compose = (DEPLOY / "docker" / "compose.yaml").read_text()
    sources = re.findall(r"^\s*-\s*\"?(\.\./[^:]+):", compose, flags=re.MULTILINE)
    assert len(sources) >= 5
    for source in sources:
        assert (DEPLOY / "docker" / source).exists(), source
    assert re.search(r":/data/watch:ro", compose), "the generator's output must be mounted read-only"
    assert ":/data/queue" in compose
    assert f"127.0.0.1:{DEFAULT_METRICS_PORT}:{DEFAULT_METRICS_PORT}" in compose
    for name in re.findall(r"^\s+(SINKWATCH_\w+):", compose, flags=re.MULTILINE):
        assert name.removeprefix("SINKWATCH_").lower() in Settings.model_fields, name


# --- systemd ----------------------------------------------------------------------


def unit_lines() -> list[str]:
    return (DEPLOY / "systemd" / "sinkwatch.service").read_text().splitlines()


def directives() -> list[tuple[str, str]]:
    return [tuple(line.split("=", 1)) for line in unit_lines() if re.match(r"^[A-Za-z]+=", line)]  # type: ignore[misc]


def test_every_unit_directive_is_explained() -> None:
    lines = unit_lines()
    for number, line in enumerate(lines):
        if re.match(r"^[A-Za-z]+=", line) or line.startswith("["):
            if line.startswith("["):
                continue
            assert number > 0 and lines[number - 1].startswith("#"), f"no comment above {line!r}"
            assert " #" not in line, f"systemd would read the comment as part of the value: {line!r}"
        else:
            assert not line.strip() or line.startswith("#"), f"neither directive nor comment: {line!r}"


def test_unit_has_the_required_directives() -> None:
    found = dict(directives())
    assert [line for line in unit_lines() if line.startswith("[")] == ["[Unit]", "[Service]", "[Install]"]
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "Restart": "on-failure",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "KillMode": "mixed",
        "OOMPolicy": "continue",
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "User": "sinkwatch",
    }
    for key, value in expected.items():
        assert found.get(key) == value, key
    assert re.fullmatch(r"\d+s", found["WatchdogSec"])
    assert found["ProtectHome"] in ("yes", "read-only", "tmpfs")
    assert found["ExecStart"].endswith("sinkwatch run")


def test_unit_restarts_what_may_pass_and_not_a_configuration_error() -> None:
    found = directives()
    assert ("RestartPreventExitStatus", "2") in found
    assert not any(key == "RestartPreventExitStatus" and "75" in value.split() for key, value in found)
    # Restart=on-failure restarts exit 75 (a full disk, a mount not up): never give up on it.
    assert dict(found)["StartLimitIntervalSec"] == "0"
    assert re.fullmatch(r"[1-9]\d*s", dict(found)["RestartSec"])


def test_unit_can_write_exactly_the_queue_and_state() -> None:
    env = dict(value.split("=", 1) for key, value in directives() if key == "Environment")
    for name in env:
        assert name.removeprefix("SINKWATCH_").lower() in Settings.model_fields, name
    writable = dict(directives())["ReadWritePaths"].split()
    assert sorted(writable) == sorted([env["SINKWATCH_QUEUE"], env["SINKWATCH_STATE_DIR"]])
    assert env["SINKWATCH_WATCH"] not in writable  # the source folder is never written to


# --- Docker -----------------------------------------------------------------------


def dockerfile() -> list[str]:
    """Instructions with continuation lines joined, comments dropped."""
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return [line.strip() for line in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines() if line.strip()]


def instruction(name: str) -> list[str]:
    return [line[len(name) :].strip() for line in dockerfile() if line.split()[0] == name]


def healthcheck_command() -> list[str]:
    (health,) = instruction("HEALTHCHECK")
    command = json.loads(health.split(" CMD ", 1)[1])
    assert isinstance(command, list)
    return command


def test_dockerfile_essentials() -> None:
    assert instruction("FROM") == ["python:3.11-slim"]
    users = instruction("USER")
    assert users and users[-1] not in ("root", "0"), users
    (entrypoint,) = instruction("ENTRYPOINT")
    assert json.loads(entrypoint) == ["sinkwatch"]  # exec form: JSON, no shell in between
    assert json.loads(instruction("CMD")[-1]) == ["run"]
    command = healthcheck_command()
    assert command[0] == "python" and "/healthz" in " ".join(command)
    env = " ".join(instruction("ENV"))
    assert "SINKWATCH_METRICS_HOST=0.0.0.0" in env
    for name in re.findall(r"(SINKWATCH_\w+)=", env):
        assert name.removeprefix("SINKWATCH_").lower() in Settings.model_fields, name
    for copied in instruction("COPY"):
        for source in copied.split()[:-1]:
            assert (DEPLOY.parent / source).exists(), source


def test_the_image_leaves_the_folders_to_its_working_directory() -> None:
    # A SINKWATCH_QUEUE in the image would conflict with a --comfyui-input given at the same level by
    # whoever extends it; the defaults (watch, queue) resolve under WORKDIR to the documented mounts.
    env = " ".join(instruction("ENV"))
    assert "SINKWATCH_WATCH" not in env and "SINKWATCH_QUEUE" not in env and "SINKWATCH_COMFYUI_INPUT" not in env
    workdir = Path(instruction("WORKDIR")[-1])
    defaults = Settings.model_fields
    assert workdir / str(defaults["watch"].default) == Path("/data/watch")
    assert workdir / str(defaults["queue"].default) == Path("/data/queue")
    compose = (DEPLOY / "docker" / "compose.yaml").read_text()
    assert ":/data/watch:ro" in compose and ":/data/queue" in compose


@pytest.mark.parametrize("healthy", [True, False])
def test_docker_healthcheck_follows_healthz(healthy: bool) -> None:
    command = [sys.executable, *healthcheck_command()[1:]]
    metrics = Metrics(CollectorRegistry())
    details: dict[str, object] = {} if healthy else {"reason": "observer stopped"}
    with http.serve(
        "127.0.0.1", 0, registry=metrics.registry, health=lambda: (healthy, details), ready=lambda: True
    ) as server:
        done = subprocess.run(
            command, env={"SINKWATCH_METRICS_PORT": str(server.port)}, capture_output=True, timeout=60, check=False
        )
    assert (done.returncode == 0) is healthy, done.stderr
