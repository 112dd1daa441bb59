"""service.rules: presets, validation errors naming file and field, selection, fingerprints, params."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from core.pipeline import PipelineParams
from service.errors import RuleError
from service.rules import (
    AnalysisSection,
    BlurSection,
    HighlightsSection,
    MaskSection,
    OutputSection,
    ResizeSection,
    Rule,
    RuleSet,
    load_rule_file,
    load_rules,
    parse_rule,
)

RULES_DIR = Path(__file__).resolve().parents[2] / "rules"
PRESETS = ("default", "gentle", "strong", "wan-720p", "wan22-5b")
SECTIONS: dict[str, type[BaseModel]] = {
    "resize": ResizeSection, "analysis": AnalysisSection, "mask": MaskSection,
    "blur": BlurSection, "highlights": HighlightsSection, "output": OutputSection,
}  # fmt: skip


FINGERPRINT_OF_DEFAULT = (
    "import sys; from service.rules import load_rule_file; print(load_rule_file(sys.argv[1]).fingerprint)"
)


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(tmp_path: Path, text: str) -> RuleError:
    path = write(tmp_path, "broken.toml", text)
    with pytest.raises(RuleError) as caught:
        load_rule_file(path)
    assert caught.value.file == str(path)
    assert str(path) in str(caught.value)
    return caught.value


def test_every_preset_validates() -> None:
    rules = load_rules(None)
    assert sorted(rules.names) == sorted(PRESETS)
    for name in PRESETS:
        assert load_rule_file(RULES_DIR / f"{name}.toml") == rules.get(name)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_states_and_documents_every_field(name: str) -> None:
    text = (RULES_DIR / f"{name}.toml").read_text()
    data = tomllib.loads(text)
    assert set(data) == set(Rule.model_fields)
    lines = text.splitlines()
    for section, model in SECTIONS.items():
        assert set(data[section]) == set(model.model_fields), section
    for index, line in enumerate(lines):  # every key has a comment above it (directly or for its group)
        if "=" in line and not line.startswith("#"):
            above = next(
                previous for previous in reversed(lines[:index]) if "=" not in previous or previous.startswith("#")
            )
            assert above.startswith("#") or above.startswith("["), f"{name}: {line!r} is not documented"


def test_the_default_preset_is_what_core_defaults_to() -> None:
    # The core tests run PipelineParams(): they test the default rule.
    assert load_rules(None).get("default").to_params() == PipelineParams()


def test_preset_sizes() -> None:
    rules = load_rules(None)
    sizes = {name: (rules.get(name).resize.width, rules.get(name).resize.height, rules.get(name).resize.multiple)
             for name in PRESETS}  # fmt: skip
    assert sizes["default"] == (832, 480, 16)
    assert sizes["wan-720p"] == (1280, 720, 16)
    assert sizes["wan22-5b"] == (1280, 704, 32)
    for name in PRESETS:
        rule = rules.get(name)
        assert rule.resize.mode == "cover" and rule.resize.orientation == "auto"
        assert rule.output.format == "png" and rule.output.keep_generator_metadata is False


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ("[resize]\nwidht = 832\n", "resize.widht", "unknown key"),
        ('colour = "red"\n', "colour", "unknown key"),
        ('[resize]\nwidth = "832"\n', "resize.width", "integer"),
        ('[mask]\nblots = "yes"\n', "mask.blots", "true or false"),
        ("[resize]\nwidth = 830\n", "resize.width", "multiple of 16"),
        ("[resize]\nheight = 500\n", "resize.height", "multiple of 16"),
        ("[resize]\nwidth = 1280\nheight = 720\nmultiple = 32\n", "resize.height", "multiple of 32"),
        ("[resize]\nmultiple = 24\n", "resize.multiple", "16 or 32"),
        ('match = ["portraits/[ab.png"]\n', "match[0]", "unclosed"),
        ('match = ["ok/*.png", "/abs/*.png"]\n', "match[1]", "relative"),
        ('match = ["a/../b.png"]\n', "match[0]", ".."),
        ('match = ["a**b/c.png"]\n', "match[0]", "whole folder"),
        ('match = "*.png"\n', "match", "array"),
        ('name = "My Rule"\n', "name", "a-z"),
        ("[mask]\nthreshold = 1.5\n", "mask.threshold", "at most 1"),
        ("[resize]\npad = [0, 0, 256]\n", "resize.pad[2]", "at most 255"),
        ("[analysis]\nfill_low = 0.8\n", "analysis.fill_low", "below fill_high"),
        ('[output]\nformat = "jpeg"\n', "output.format", "png"),
        ('[blur]\nmode = "box"\n', "blur.mode", "gaussian"),
    ],
)
def test_broken_files_name_file_and_field(tmp_path: Path, text: str, field: str, words: str) -> None:
    error = error_of(tmp_path, text)
    assert error.field == field
    assert words in str(error)
    assert f": {field}: " in str(error)


def test_bad_toml_names_the_file_and_where(tmp_path: Path) -> None:
    error = error_of(tmp_path, "[resize\nwidth = 832\n")
    assert error.field is None and "line 1" in str(error)


def test_all_problems_of_a_file_are_reported(tmp_path: Path) -> None:
    error = error_of(tmp_path, '[resize]\nwidth = 830\n[mask]\nthreshold = "high"\n')
    assert error.field == "resize.width"
    assert "mask.threshold" in str(error)


def test_an_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(RuleError) as caught:
        load_rule_file(tmp_path / "missing.toml")
    assert caught.value.file == str(tmp_path / "missing.toml")


def test_a_fifo_named_like_a_rule_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    """Read, it would block until something writes to it: the daemon stuck for good, deaf to SIGTERM."""
    write(tmp_path, "default.toml", 'name = "default"\n')
    os.mkfifo(tmp_path / "pipe.toml")
    for load in (load_rules, lambda folder: load_rule_file(folder / "pipe.toml")):
        with pytest.raises(RuleError) as caught:
            load(tmp_path)
        assert caught.value.file == str(tmp_path / "pipe.toml") and "not a regular file" in caught.value.message


def test_a_minimal_rule_takes_every_default(tmp_path: Path) -> None:
    rule = load_rule_file(write(tmp_path, "x.toml", 'name = "x"\n'))
    assert rule.to_params() == PipelineParams()
    assert rule.match == () and rule.priority == 0


def test_to_params_maps_every_section(tmp_path: Path) -> None:
    rule = load_rule_file(RULES_DIR / "wan22-5b.toml")
    params = rule.to_params()
    assert (params.resize.width, params.resize.height, params.resize.multiple) == (1280, 704, 32)
    assert params.mask.min_area == 576 and params.mask.dilate == 6 and params.mask.feather == 4.5
    assert params.highlights.max_area == 270 and params.highlights.radius == 8
    gentle = load_rule_file(RULES_DIR / "gentle.toml").to_params()
    assert (gentle.mask.threshold, gentle.mask.max_coverage, gentle.blur.sigma, gentle.blur.target) == (
        0.25,
        0.12,
        1.0,
        0.15,
    )
    custom = parse_rule(
        '[output]\nheatmap = "colormap"\ncolormap = "turbo"\noutline = false\n'
        '[blur]\nmode = "gaussian"\nstrength = 0.5\n'
        '[analysis]\ntexture = false\n[highlights]\nenabled = false\n[mask]\nmode = "percentile"\npercentile = 80.0\n',
        file="custom",
    ).to_params()
    assert (custom.heatmap.style, custom.heatmap.colormap, custom.heatmap.outline) == ("colormap", "turbo", False)
    assert (custom.blur.mode, custom.blur.strength) == ("gaussian", 0.5)
    assert custom.analysis.texture is False and custom.highlights.enabled is False
    assert (custom.mask.mode, custom.mask.percentile) == ("percentile", 80.0)


def test_fingerprints_are_stable_and_mean_the_output(tmp_path: Path) -> None:
    base = load_rule_file(RULES_DIR / "default.toml")
    assert base.fingerprint == load_rule_file(RULES_DIR / "default.toml").fingerprint
    # Stable across processes: a worker, a restarted daemon and the ledger's old rows must agree. Another
    # hash seed makes anything built on Python's salted hash() differ there.
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    elsewhere = subprocess.run(
        [sys.executable, "-c", FINGERPRINT_OF_DEFAULT, str(RULES_DIR / "default.toml")],
        env={**os.environ, "PYTHONHASHSEED": seed},
        cwd=RULES_DIR.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    assert elsewhere == base.fingerprint, f"another process (PYTHONHASHSEED={seed}) computed another fingerprint"
    assert len({load_rules(None).get(name).fingerprint for name in PRESETS}) == len(PRESETS)
    same = parse_rule('description = "another text"\nmatch = ["x/**"]\npriority = 5\n', file="a")
    assert same.fingerprint == parse_rule("", file="b").fingerprint  # selection and prose do not change outputs
    changed = parse_rule("[blur]\nsigma = 1.3\n", file="c")
    assert changed.fingerprint != same.fingerprint


def test_rules_and_rule_sets_travel_to_worker_processes() -> None:
    rules = load_rules(None)
    copy = pickle.loads(pickle.dumps(rules))
    assert copy.names == rules.names and copy.fingerprint == rules.fingerprint
    assert copy.get("wan22-5b") == rules.get("wan22-5b")
    assert copy.get("wan22-5b").fingerprint == rules.get("wan22-5b").fingerprint


def test_rules_are_frozen() -> None:
    rule = load_rules(None).get("default")
    before = rule.priority
    with pytest.raises(ValidationError, match="frozen_instance"):
        rule.priority = before + 1  # type: ignore[misc]
    assert rule.priority == before


@pytest.mark.parametrize(
    ("glob", "path", "expected"),
    [
        ("*.png", "a.png", True),
        ("*.png", "sub/dir/a.PNG", True),  # no '/': the file name, in any folder; case-insensitive
        ("*.png", "a.jpg", False),
        ("portraits/*.png", "portraits/a.png", True),
        ("portraits/*.png", "portraits/x/a.png", False),  # '*' stays inside one folder
        ("portraits/**", "portraits/x/y/a.png", True),
        ("a/**/c.png", "a/c.png", True),
        ("a/**/c.png", "a/b/d/c.png", True),
        ("a/**/c.png", "b/a/c.png", False),
        ("**/tmp_*.png", "x/tmp_1.png", True),
        ("shot_??.png", "shot_01.png", True),
        ("shot_??.png", "shot_1.png", False),
        ("shot_[0-4].png", "shot_3.png", True),
        ("shot_[!0-4].png", "shot_3.png", False),
        ("shot_[!0-4].png", "shot_7.png", True),
    ],
)
def test_glob_semantics(glob: str, path: str, expected: bool) -> None:
    rule = Rule(name="r", match=(glob,))
    assert rule.matches(path) is expected


def test_selection_takes_the_highest_priority_then_the_name(tmp_path: Path) -> None:
    write(tmp_path, "default.toml", 'name = "default"\n')
    write(tmp_path, "portraits.toml", 'name = "portraits"\nmatch = ["portraits/**", "*_portrait.png"]\npriority = 10\n')
    write(tmp_path, "closeups.toml", 'name = "closeups"\nmatch = ["portraits/close/**"]\npriority = 20\n')
    write(tmp_path, "b-tie.toml", 'name = "b-tie"\nmatch = ["tie/*"]\npriority = 1\n')
    write(tmp_path, "a-tie.toml", 'name = "a-tie"\nmatch = ["tie/*"]\npriority = 1\n')
    write(tmp_path, "notes.txt", "not a rule")
    rules = load_rules(tmp_path)
    assert rules.source == str(tmp_path)
    assert rules.select("landscape.png").name == "default"
    assert rules.select("portraits/a.png").name == "portraits"
    assert rules.select("batch/x_portrait.png").name == "portraits"
    assert rules.select("portraits/close/a.png").name == "closeups"
    assert rules.select("tie/x.png").name == "a-tie"
    assert rules.get("portraits").priority == 10
    with pytest.raises(KeyError):
        rules.get("nope")


def test_shipped_presets_route_their_subfolders() -> None:
    rules = load_rules(None)
    assert rules.select("x.png").name == "default"
    assert rules.select("720p/x.png").name == "wan-720p"
    assert rules.select("5b/deep/x.png").name == "wan22-5b"
    assert rules.select("gentle/x.png").name == "gentle"
    assert rules.select("strong/x.png").name == "strong"


def test_duplicate_names_in_one_folder(tmp_path: Path) -> None:
    write(tmp_path, "a.toml", 'name = "default"\n')
    write(tmp_path, "b.toml", 'name = "default"\n')
    with pytest.raises(RuleError) as caught:
        load_rules(tmp_path)
    assert caught.value.file == str(tmp_path / "b.toml") and caught.value.field == "name"
    assert "a.toml" in str(caught.value)


def test_a_folder_needs_a_default_rule(tmp_path: Path) -> None:
    write(tmp_path, "portraits.toml", 'name = "portraits"\nmatch = ["p/**"]\n')
    with pytest.raises(RuleError, match="default"):
        load_rules(tmp_path)
    with pytest.raises(RuleError, match="default"):
        RuleSet(rules=(Rule(name="x"),), source="test")


def test_a_broken_file_fails_the_folder(tmp_path: Path) -> None:
    write(tmp_path, "default.toml", 'name = "default"\n')
    write(tmp_path, "bad.toml", "[resize]\nwidth = 831\n")
    with pytest.raises(RuleError) as caught:
        load_rules(tmp_path)
    assert caught.value.file == str(tmp_path / "bad.toml") and caught.value.field == "resize.width"


@pytest.mark.parametrize("setup", ["missing", "empty"])
def test_no_folder_or_no_rules(tmp_path: Path, setup: str) -> None:
    folder = tmp_path / "rules"
    if setup == "empty":
        folder.mkdir()
    with pytest.raises(RuleError):
        load_rules(folder)


def test_a_name_may_not_end_with_a_newline(tmp_path: Path) -> None:
    error = error_of(tmp_path, 'name = "abc\\n"\n')
    assert error.field == "name" and "'abc\\n'" in str(error)


@pytest.mark.parametrize("folder", [False, True])
def test_a_rule_file_saved_with_a_byte_order_mark_reads_like_any_other(tmp_path: Path, folder: bool) -> None:
    text = 'name = "default"\nmatch = ["bom/**"]\n[resize]\nwidth = 640\n'
    path = tmp_path / "default.toml"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    rule = load_rules(tmp_path).get("default") if folder else load_rule_file(path)
    assert rule == parse_rule(text, file="same text without the mark")


FLOAT_FIELDS = [
    (section, name)
    for section, model in SECTIONS.items()
    for name, field in model.model_fields.items()
    if field.annotation is float
]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize(("section", "name"), FLOAT_FIELDS)
def test_no_float_field_takes_inf_or_nan(tmp_path: Path, section: str, name: str, value: str) -> None:
    error = error_of(tmp_path, f"[{section}]\n{name} = {value}\n")
    assert error.field == f"{section}.{name}" and "finite number" in str(error)


def test_every_section_has_float_fields_to_check() -> None:
    assert {section for section, _name in FLOAT_FIELDS} == set(SECTIONS) - {"resize"}  # resize has none


@pytest.mark.parametrize("scale", ["1e-300", "0.5"])
def test_the_analysis_scale_is_at_least_one_grey_level(tmp_path: Path, scale: str) -> None:
    error = error_of(tmp_path, f"[analysis]\nscale = {scale}\n")
    assert error.field == "analysis.scale" and "at least 1" in str(error)
    assert parse_rule("[analysis]\nscale = 1.0\n", file="lowest").analysis.scale == 1.0
