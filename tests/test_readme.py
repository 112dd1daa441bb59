"""The README stays true: its two commands, its settings table and its metrics table."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from service.metrics import Metrics
from service.settings import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _block(marker: str) -> list[str]:
    match = re.search(rf"<!-- {marker} -->\n```\n(.*?)\n```\n<!-- /{marker} -->", README, re.S)
    assert match, f"README has no {marker} block"
    return match.group(1).splitlines()


def test_each_command_is_one_line_that_makes_its_own_venv() -> None:
    for marker, tail in (("run-command", "sinkwatch run"), ("test-command", "pytest")):
        (line,) = _block(marker)
        assert line.startswith("python3 -m venv .venv && ")
        assert tail in line


def test_every_setting_has_a_flag_and_variable_in_the_table() -> None:
    for name in Settings.model_fields:
        flag = "--" + name.replace("_", "-")
        assert f"`{flag}`" in README, flag
        assert f"`SINKWATCH_{name.upper()}`" in README, name


def test_every_exported_sinkwatch_metric_is_documented() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    names = {metric.name for metric in registry.collect() if metric.name.startswith("sinkwatch_")}
    assert names
    for name in names:
        documented = name if name in README else f"{name}_total"
        assert documented in README, name
