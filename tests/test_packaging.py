"""`pip install .` gives a working `sinkwatch` that finds the shipped rules without the source tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What a wheel is not built from, and may be large or half-written while the tests run.
UNBUILT = (
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    ".hypothesis",
    "results",
    "watch",
    "queue",
)
PRESETS = {"default.toml", "gentle.toml", "strong.toml", "wan-720p.toml", "wan22-5b.toml"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project built as a wheel and installed into a folder outside the tree."""
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools writes build/ and *.egg-info into the tree it builds, and the
    # test workers (pytest -n 2) may each build at once.
    tree = tmp_path_factory.mktemp("tree") / "sinkwatch"
    shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(*UNBUILT))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(tree)],
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob("sinkwatch-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {f"rules/{name}" for name in PRESETS} <= names
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    return target


def _run(target: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # The dependencies come from this venv; sinkwatch itself only from the install folder.
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONSAFEPATH": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_installed_cli_help_lists_every_command(installed: Path, tmp_path: Path) -> None:
    result = _run(installed, "-m", "service", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for command in ("run", "process", "analyze", "rules"):
        assert command in result.stdout
    assert (installed / "bin" / "sinkwatch").exists()


def test_installed_package_finds_shipped_rules(installed: Path, tmp_path: Path) -> None:
    code = "import service.rules as r, rules; print(rules.__path__); print(','.join(r.load_rules(None).names))"
    result = _run(installed, "-c", code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert str(installed) in result.stdout.splitlines()[0]
    assert set(result.stdout.splitlines()[1].split(",")) == {name.removesuffix(".toml") for name in PRESETS}


def test_installed_rules_check_passes_on_shipped_presets(installed: Path, tmp_path: Path) -> None:
    result = _run(installed, "-m", "service", "rules", "check", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
