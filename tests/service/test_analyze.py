"""`sinkwatch analyze` and `sinkwatch rules check`, through the real command line."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core import pipeline
from core.pipeline import PipelineParams, PipelineResult
from service.cli import main
from tests.conftest import photo_file

RULES_DIR = Path(__file__).resolve().parents[2] / "rules"
REQUIRED = {"rule", "width", "height", "mask_coverage", "energy_mean_before", "energy_mean_after", "ssim"}


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_json_report(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _err = run_cli(capsys, "analyze", str(photo_file("coffee")), "--json")
    assert code == 0
    report = json.loads(out)
    assert report.keys() >= REQUIRED
    assert report["rule"] == "default" and (report["width"], report["height"]) == (832, 480)
    assert (report["source_width"], report["source_height"]) == (600, 400)
    assert 0.02 <= report["mask_coverage"] <= 0.35 and report["ssim"] >= 0.93
    assert report["energy_mean_after"] < report["energy_mean_before"]


def test_human_report_and_every_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outs = {kind: tmp_path / f"{kind}.png" for kind in ("heatmap", "mask", "cleaned", "preview")}
    args = [f"--{kind}={path}" for kind, path in outs.items()]
    code, out, _err = run_cli(capsys, "analyze", str(photo_file("astronaut")), *args)
    assert code == 0
    assert "mask coverage" in out and "SSIM" in out and "default" in out
    images = {kind: Image.open(path) for kind, path in outs.items()}
    assert images["heatmap"].mode == "RGB" and images["heatmap"].size == (832, 480)
    assert images["cleaned"].mode == "RGB" and images["cleaned"].size == (832, 480)
    assert images["mask"].mode == "L" and images["mask"].size == (832, 480)
    assert images["preview"].size == (4 * 832 + 3 * 8, 480)
    mask = np.asarray(images["mask"])
    assert mask.max() == 255 and mask.min() == 0 and 0 < (mask > 0).mean() < 0.5
    for path in outs.values():
        assert str(path) in out


def test_the_report_matches_the_written_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mask_path = tmp_path / "mask.png"
    code, out, _err = run_cli(capsys, "analyze", str(photo_file("chelsea")), "--json", "--mask", str(mask_path))
    report = json.loads(out)
    assert code == 0 and report["written"] == {"mask": str(mask_path)}
    mask = np.asarray(Image.open(mask_path), dtype=np.float64) / 255.0
    assert mask.mean() == pytest.approx(report["mask_coverage"], abs=0.002)


@pytest.mark.parametrize("choice", ["wan22-5b", str(RULES_DIR / "wan22-5b.toml")])
def test_a_rule_by_name_or_by_file(capsys: pytest.CaptureFixture[str], choice: str) -> None:
    code, out, _err = run_cli(capsys, "analyze", str(photo_file("rocket")), "--json", "--rule", choice)
    report = json.loads(out)
    assert code == 0 and report["rule"] == "wan22-5b" and (report["width"], report["height"]) == (1280, 704)


def test_a_rule_folder_selects_by_file_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], write_png: Callable[[str, np.ndarray], Path]
) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "default.toml").write_text('name = "default"\n')
    (rules / "portrait.toml").write_text(
        'name = "portrait"\nmatch = ["*_portrait.png"]\n[resize]\nwidth = 640\nheight = 640\n'
    )
    image = write_png("me_portrait.png", np.full((300, 300, 3), 90, np.uint8))
    code, out, _err = run_cli(capsys, "analyze", str(image), "--json", "--rules", str(rules))
    report = json.loads(out)
    assert code == 0 and report["rule"] == "portrait" and report["mask_coverage"] == 0.0


def test_with_its_watch_folder_a_file_gets_the_rule_the_daemon_selects_for_its_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    watch = tmp_path / "watch"
    (watch / "5b").mkdir(parents=True)
    shutil.copyfile(photo_file("coffee"), watch / "5b" / "coffee.png")
    code, out, _err = run_cli(capsys, "analyze", str(watch / "5b" / "coffee.png"), "--json", "--watch", str(watch))
    report = json.loads(out)
    assert code == 0 and report["rule"] == "wan22-5b" and (report["width"], report["height"]) == (1280, 704)
    code, out, _err = run_cli(capsys, "analyze", str(watch / "5b" / "coffee.png"), "--json")
    assert code == 0 and json.loads(out)["rule"] == "default", "without it, the file's name alone"
    (watch / "plain").mkdir()
    shutil.copyfile(photo_file("coffee"), watch / "plain" / "coffee.png")
    (watch / "5b" / "link.png").symlink_to(watch / "plain" / "coffee.png")
    code, out, _err = run_cli(capsys, "analyze", str(watch / "5b" / "link.png"), "--json", "--watch", str(watch))
    assert code == 0 and json.loads(out)["rule"] == "wan22-5b", "a link is selected by its own path, as the daemon does"
    code, _out, err = run_cli(capsys, "analyze", str(photo_file("coffee")), "--watch", str(watch))
    assert code == 2 and err == f"sinkwatch: {photo_file('coffee')}: not inside the watch folder {watch}\n"


def test_an_unknown_rule_is_a_configuration_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = run_cli(capsys, "analyze", str(photo_file("coffee")), "--rule", "nope")
    assert code == 2 and "no rule named 'nope'" in err and "default" in err


def test_not_an_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bogus = tmp_path / "notes.png"
    bogus.write_text("hello, not a picture")
    code, out, err = run_cli(capsys, "analyze", str(bogus), "--json")
    assert code == 1 and out == "" and str(bogus) in err and "not_image" in err


def test_rules_check_presets(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "rules", "check")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 5
    assert all(line.startswith("ok ") for line in lines)
    assert "5 rule file(s)" in err


def test_without_a_folder_given_rules_check_and_analyze_take_the_rules_and_limits_run_would(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "rules"
    folder.mkdir()
    (folder / "default.toml").write_text('name = "default"\n[resize]\nwidth = 1280\nheight = 720\n')
    monkeypatch.setenv("SINKWATCH_RULES", str(folder))
    code, out, err = run_cli(capsys, "rules", "check")
    assert code == 0 and len(out.splitlines()) == 1 and f"1 rule file(s) in {folder}" in err
    code, out, _err = run_cli(capsys, "analyze", str(photo_file("coffee")), "--json")
    assert code == 0 and (json.loads(out)["width"], json.loads(out)["height"]) == (1280, 720)

    monkeypatch.setenv("SINKWATCH_MAX_BYTES", "10000")
    code, _out, err = run_cli(capsys, "analyze", str(photo_file("coffee")), "--json")
    assert code == 1 and "(too_large)" in err


def test_rules_check_a_broken_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "default.toml").write_text('name = "default"\n')
    (tmp_path / "bad-width.toml").write_text('name = "w"\n[resize]\nwidth = 830\n')
    (tmp_path / "bad-key.toml").write_text('name = "k"\n[mask]\nthreshhold = 0.2\n')
    code, out, err = run_cli(capsys, "rules", "check", str(tmp_path))
    lines = sorted(out.splitlines())
    assert code == 1 and len(lines) == 3
    assert lines[0].startswith("FAIL") and f"{tmp_path / 'bad-key.toml'}: mask.threshhold: unknown key" in lines[0]
    assert (
        lines[1].startswith("FAIL") and f"{tmp_path / 'bad-width.toml'}: resize.width: must be a multiple" in lines[1]
    )
    assert lines[2].startswith("ok ") and "default.toml" in lines[2]
    assert "2 problem(s)" in err


def test_rules_check_an_unreadable_file_hides_no_other(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "default.toml").write_text('name = "default"\n')
    (tmp_path / "latin1.toml").write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    (tmp_path / "dangling.toml").symlink_to(tmp_path / "nowhere.toml")
    (tmp_path / "folder.toml").mkdir()
    (tmp_path / "wide.toml").write_text('name = "w"\n[resize]\nwidth = 830\n')
    code, out, err = run_cli(capsys, "rules", "check", str(tmp_path))
    lines = dict(line.split(str(tmp_path) + "/", 1)[1].split(":", 1) for line in out.splitlines())
    assert code == 1 and sorted(lines) == ["dangling.toml", "default.toml", "folder.toml", "latin1.toml", "wide.toml"]
    assert [name for name, line in lines.items() if "cannot read rule file" in line] == [
        "dangling.toml",
        "folder.toml",
        "latin1.toml",
    ]
    assert out.count("FAIL") == 4 and "4 problem(s)" in err


def test_rules_check_one_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "portraits.toml").write_text('name = "portraits"\nmatch = ["portraits/**"]\n')
    (tmp_path / "wide.toml").write_text('name = "w"\n[resize]\nwidth = 830\n')
    code, out, err = run_cli(capsys, "rules", "check", str(tmp_path / "portraits.toml"))
    assert code == 0 and out.startswith(f"ok   {tmp_path / 'portraits.toml'}: portraits 832x480") and "valid" in err
    code, out, _err = run_cli(capsys, "rules", "check", str(tmp_path / "wide.toml"))
    assert code == 1 and out.startswith(f"FAIL {tmp_path / 'wide.toml'}: resize.width: must be a multiple")


def test_rules_check_finds_set_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.toml").write_text('name = "portraits"\n')
    (tmp_path / "b.toml").write_text('name = "portraits"\n')
    code, out, _err = run_cli(capsys, "rules", "check", str(tmp_path))
    assert code == 1 and "duplicate rule name 'portraits'" in out and "b.toml: name:" in out


def test_rules_check_a_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _err = run_cli(capsys, "rules", "check", str(tmp_path / "nowhere"))
    assert code == 1 and "FAIL" in out and "nowhere" in out


@pytest.mark.parametrize("spelling", ["its path", "another path to it", "a hard link to it"])
def test_an_output_is_never_written_over_the_image_analysed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, spelling: str
) -> None:
    source = tmp_path / "coffee.png"
    shutil.copyfile(photo_file("coffee"), source)
    before = source.read_bytes()
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    target = {
        "its path": source,
        "another path to it": Path("../coffee.png"),
        "a hard link to it": tmp_path / "hard.png",
    }
    if spelling == "a hard link to it":
        (tmp_path / "hard.png").hardlink_to(source)

    code, out, err = run_cli(capsys, "analyze", str(source), "--heatmap", "h.png", "--cleaned", str(target[spelling]))

    assert code == 2 and out == ""
    assert (
        err == f"sinkwatch: {target[spelling]}: --cleaned is the image analysed: sinkwatch never writes over a source\n"
    )
    assert source.read_bytes() == before and not Path("h.png").exists(), "nothing is written before the refusal"


def test_two_outputs_to_one_file_are_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(
        capsys,
        "analyze",
        str(photo_file("coffee")),
        "--json",
        "--heatmap",
        "x.png",
        "--cleaned",
        str(tmp_path / "x.png"),
    )
    assert code == 2 and out == ""
    assert err == f"sinkwatch: {tmp_path / 'x.png'}: --heatmap and --cleaned name the same file\n"
    assert not (tmp_path / "x.png").exists()


def test_a_reader_that_goes_away_ends_the_report_quietly(tmp_path: Path) -> None:
    """`sinkwatch analyze FILE | head -1`: the pipe is closed before the report is written."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "service", "analyze", str(photo_file("coffee"))],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (1, "")


def test_a_file_name_cannot_send_escapes_to_a_terminal_in_the_report_or_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shown = tmp_path / "red\x1b[31mX.png"
    shutil.copyfile(photo_file("coffee"), shown)
    broken = tmp_path / "bad\x1b[31mY.png"
    broken.write_text("not a picture")

    assert run_cli(capsys, "analyze", str(shown), "--mask", "/dev/null", "--heatmap", "/dev/null")[0] == 0
    code, out, _err = run_cli(capsys, "analyze", str(shown))
    bad_code, _out, err = run_cli(capsys, "analyze", str(broken))

    assert code == 0 and out.startswith(f"{tmp_path}/red\\x1b[31mX.png: PNG 600x400 -> 832x480\n"), out
    assert bad_code == 1 and err == f"sinkwatch analyze: {tmp_path}/bad\\x1b[31mY.png: not an image (not_image)\n"


def test_a_missing_image_is_said_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "analyze", str(tmp_path / "typo.png"))
    assert (code, out, err) == (2, "", f"sinkwatch: {tmp_path / 'typo.png'}: no such file\n")


@pytest.mark.parametrize("where", ["missing folder", "a folder", "a file in a file"])
def test_an_output_that_cannot_be_written_is_one_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    (tmp_path / "plain").write_text("x")
    target = {
        "missing folder": tmp_path / "nowhere" / "x.png",
        "a folder": tmp_path,
        "a file in a file": tmp_path / "plain" / "x.png",
    }[where]
    heatmap = tmp_path / "heatmap.png"
    code, out, err = run_cli(
        capsys, "analyze", str(photo_file("coffee")), "--json", "--heatmap", str(heatmap), "--cleaned", str(target)
    )
    assert code == 1 and out == ""
    [line] = err.splitlines()
    assert line.startswith(f"sinkwatch analyze: {target}: cannot write: ")
    assert heatmap.is_file(), "what could be written before was written"


def test_scores_that_are_not_numbers_fail_clearly_instead_of_printing_nan(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_run = pipeline.run

    def nan_ssim(image: np.ndarray, params: PipelineParams) -> PipelineResult:
        result = real_run(image, params)
        return dataclasses.replace(result, scores=dataclasses.replace(result.scores, ssim=math.nan))

    monkeypatch.setattr(pipeline, "run", nan_ssim)
    for extra in (["--json"], []):
        code, out, err = run_cli(capsys, "analyze", str(photo_file("coffee")), *extra)
        assert code == 1 and out == ""
        assert "not numbers: ssim" in err and str(photo_file("coffee")) in err


def test_rules_check_and_analyze_name_a_glob_with_a_reversed_range(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "default.toml").write_text('name = "default"\n')
    (tmp_path / "portraits.toml").write_text('name = "portraits"\nmatch = ["portrait_[z-a]*.png"]\n')
    code, out, _err = run_cli(capsys, "rules", "check", str(tmp_path))
    assert code == 1
    assert f"FAIL {tmp_path / 'portraits.toml'}: match[0]: reversed range 'z-a'" in out
    code, out, err = run_cli(capsys, "analyze", str(photo_file("coffee")), "--rules", str(tmp_path))
    assert code == 2 and out == "" and f"{tmp_path / 'portraits.toml'}: match[0]" in err


def test_rules_check_reads_a_file_saved_with_a_byte_order_mark(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "default.toml").write_bytes(b'\xef\xbb\xbfname = "default"\n')
    code, out, _err = run_cli(capsys, "rules", "check", str(tmp_path))
    assert code == 0 and out.startswith("ok ")


def test_a_large_jpeg_is_analysed_as_the_daemon_publishes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The daemon decodes a JPEG at least twice the frame's size at reduced scale: analyze must show that frame.
    source = tmp_path / "big.jpg"
    big = np.asarray(Image.open(photo_file("coffee")).convert("RGB").resize((2000, 1800), Image.Resampling.BICUBIC))
    Image.fromarray(big).save(source, quality=92)
    cleaned = tmp_path / "cleaned.png"
    code, _out, err = run_cli(capsys, "analyze", str(source), "--cleaned", str(cleaned))
    assert code == 0, err
    queue = tmp_path / "queue"
    done = run_cli(capsys, "process", str(source), "--queue", str(queue), "--workers", "1", "--metrics-port", "0")
    assert done[0] == 0, done[2]
    published = np.asarray(Image.open(queue / "big.png").convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(cleaned).convert("RGB")), published)
