"""`sinkwatch analyze FILE`: the scores and Matrix Vision of one image, for tuning a rule.

Runs the daemon's pipeline on one file and prints what it measured; with
``--json`` one JSON object. Writes the heatmap, the mask (8-bit grey), the
cleaned frame and a side-by-side preview where asked. Nothing is published.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from core import pipeline
from service.encode import encode_png
from service.errors import ConfigError, RuleError, SinkwatchError
from service.logs import printable
from service.rules import Rule, load_rule_file, load_rules
from service.runner import decode_source
from service.selection import linked_path
from service.settings import shared_settings

# Score lines of the human-readable report: (key, label, format).
_REPORT = (
    ("mask_coverage", "mask coverage", "{:.1%}"),
    ("energy_mean_before", "energy mean before", "{:.4f}"),
    ("energy_mean_after", "energy mean after", "{:.4f}"),
    ("energy_p95_before", "energy p95 before", "{:.4f}"),
    ("energy_p95_after", "energy p95 after", "{:.4f}"),
    ("sink_energy_before", "sink energy before", "{:.4f}"),
    ("sink_energy_after", "sink energy after", "{:.4f}"),
    ("sink_energy_reduction", "sink energy reduction", "{:.1%}"),
    ("highlight_coverage", "tamed highlights", "{:.2%}"),
    ("ssim", "SSIM to the resized frame", "{:.4f}"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, metavar="FILE", help="the image to analyse")
    parser.add_argument(
        "--rule",
        metavar="NAME|PATH",
        help="rule name (from --rules or the presets) or a rule file; default: the rule selected for FILE's name "
        "(its path in --watch, when given)",
    )
    parser.add_argument(
        "--rules",
        type=Path,
        metavar="DIR",
        help="rule folder (default: SINKWATCH_RULES or the config file's, else the presets)",
    )
    parser.add_argument(
        "--watch",
        type=Path,
        metavar="DIR",
        help="the watch folder FILE is in: the rule is selected for its path there, as the daemon selects it "
        "(rules matching folders, such as the presets' 5b/**, need it)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a report")
    parser.add_argument("--heatmap", type=Path, metavar="OUT.png", help="write the Matrix Vision heatmap")
    parser.add_argument("--mask", type=Path, metavar="OUT.png", help="write the soft sink mask as 8-bit grey")
    parser.add_argument("--cleaned", type=Path, metavar="OUT.png", help="write the cleaned frame")
    parser.add_argument(
        "--preview", type=Path, metavar="OUT.png", help="write resized | Matrix Vision | cleaned | Matrix Vision after"
    )


def main(args: argparse.Namespace) -> int:
    settings = shared_settings()  # the daemon's rules and limits, unless the flags say otherwise
    targets = {kind: getattr(args, kind) for kind in ("heatmap", "mask", "cleaned", "preview")}
    check_targets(args.file, {kind: path for kind, path in targets.items() if path is not None})
    rule = choose_rule(args.rule, args.rules or settings.rules, args.file, watch=args.watch)
    try:
        decoded = decode_source(args.file, rule, max_bytes=settings.max_bytes, max_pixels=settings.max_pixels)
    except SinkwatchError as exc:
        print(printable(f"sinkwatch analyze: {exc} ({exc.reason})"), file=sys.stderr)
        return 1
    params = rule.to_params()
    result = pipeline.run(decoded.rgb, params)
    scores = result.scores.as_dict()
    # A score that is not a number would print as NaN, which is not JSON and not a measurement.
    broken = sorted(key for key, value in scores.items() if not math.isfinite(value))
    if broken:
        said = (
            f"sinkwatch analyze: {args.file}: rule {rule.name!r} gave scores that are not numbers: {', '.join(broken)}"
        )
        print(printable(said), file=sys.stderr)
        return 1
    # Each picture is made only if its file was asked for.
    outputs: dict[str, tuple[Path | None, Callable[[], np.ndarray]]] = {
        "heatmap": (args.heatmap, lambda: result.heatmap),
        "mask": (args.mask, lambda: np.rint(result.mask * 255.0).astype(np.uint8)),
        "cleaned": (args.cleaned, lambda: result.cleaned),
        "preview": (args.preview, lambda: pipeline.preview(result, params=params.heatmap)),
    }
    written: dict[str, str] = {}
    for kind, (target, picture) in outputs.items():
        if target is not None:
            try:
                target.write_bytes(encode_png(picture()))
            except OSError as exc:
                print(printable(f"sinkwatch analyze: {target}: cannot write: {exc.strerror or exc}"), file=sys.stderr)
                return 1
            written[kind] = str(target)
    if args.json:
        report = {
            "file": str(args.file),
            "rule": rule.name,
            "fingerprint": rule.fingerprint,
            "source_width": decoded.source_size[0],
            "source_height": decoded.source_size[1],
            **{key: int(value) if key in ("width", "height") else value for key, value in scores.items()},
            "timings_ms": {stage: round(seconds * 1000, 3) for stage, seconds in result.timings.items()},
            "written": written,
        }
        print(json.dumps(report, sort_keys=True, allow_nan=False))
        return 0
    width, height = decoded.source_size
    size = f"{width}x{height} -> {int(scores['width'])}x{int(scores['height'])}"
    print(printable(f"{args.file}: {decoded.format} {size}"))
    print(f"  rule                       {rule.name} ({rule.fingerprint})")
    for key, label, form in _REPORT:
        print(f"  {label:26s} {form.format(scores[key])}")
    timings = ", ".join(f"{stage} {seconds * 1000:.1f}" for stage, seconds in result.timings.items())
    print(f"  time (ms)                  {timings}")
    for kind, path in written.items():
        print(printable(f"  wrote {kind:20s} {path}"))
    return 0


def check_targets(file: Path, targets: dict[str, Path]) -> None:
    """Refuse outputs that would overwrite FILE (the source is never modified) or one another."""
    try:
        os.stat(file)
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError("no such file", path=file) from None
    except OSError:
        pass  # the decoder says what keeps it from being read
    seen: dict[Path, str] = {}
    for kind, target in targets.items():
        if _same_file(target, file):
            raise ConfigError(f"--{kind} is the image analysed: sinkwatch never writes over a source", path=target)
        where = target.resolve()
        if where in seen and not _device(target):
            raise ConfigError(f"--{seen[where]} and --{kind} name the same file", path=target)
        seen[where] = kind


def _device(path: Path) -> bool:
    """Whether `path` is a character device (/dev/null takes any number of outputs)."""
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return False


def _same_file(first: Path, second: Path) -> bool:
    try:
        return os.path.samefile(first, second)
    except OSError:  # one of them does not exist (yet): not one file
        return False


def choose_rule(choice: str | None, folder: Path | None, file: Path, *, watch: Path | None = None) -> Rule:
    """A rule file, a rule by name, or the rule the set selects for the file's name (its path in `watch`)."""
    if choice is not None and (choice.endswith(".toml") or Path(choice).is_file()):
        return load_rule_file(choice)
    rules = load_rules(folder)
    if choice is None:
        return rules.select(file.name if watch is None else _in_watch(file, watch))
    try:
        return rules.get(choice)
    except KeyError:
        known = ", ".join(rules.names)
        raise RuleError(f"no rule named {choice!r}; known: {known}", file=rules.source, field="name") from None


def _in_watch(file: Path, watch: Path) -> str:
    try:
        return linked_path(file).relative_to(watch.resolve()).as_posix()
    except ValueError:
        raise ConfigError(f"not inside the watch folder {watch}", path=file) from None
