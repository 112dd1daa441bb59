"""Rule files: TOML, validated by frozen pydantic models, mapped onto core's parameters.

A rule is data. :class:`Rule` assembles the sections of a rule file (one
model per core dataclass, in :mod:`service.rule_sections`) and maps them onto
core's parameters. Types are strict (``width = "832"`` or ``blots = "yes"`` is
an error, not a guess) and unknown keys are refused. Any problem raises
:class:`~service.errors.RuleError` naming the file, the field and what was
expected (the wording lives in :mod:`service.rule_errors`).

``match`` globs (grammar in :mod:`service.rule_globs`) are matched against the
path relative to the watch folder; a glob without ``/`` matches the file name
in any folder. Selection takes the highest ``priority`` among the rules with a
matching glob (ties: by name), and the rule named ``default`` otherwise.

Callers import everything about rules from here: the section models and
:func:`compile_glob` are re-exported (``__all__``) so that the split into
modules stays an implementation detail.
"""

from __future__ import annotations

import hashlib
import json
import re
import stat
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path, PurePosixPath
from typing import Annotated

from pydantic import Field, ValidationError, field_validator

from core.blur import BlurParams
from core.frequency import AnalysisParams
from core.heatmap import HeatmapParams
from core.highlights import HighlightParams
from core.mask import MaskParams
from core.pipeline import PipelineParams
from core.resize import ResizeParams
from service.errors import RuleError
from service.rule_errors import FieldError, rule_error
from service.rule_globs import compile_glob
from service.rule_sections import (
    AnalysisSection,
    BlurSection,
    HighlightsSection,
    MaskSection,
    OutputSection,
    ResizeSection,
    StrictModel,
)

__all__ = [
    "DEFAULT_RULE",
    "AnalysisSection",
    "BlurSection",
    "HighlightsSection",
    "MaskSection",
    "OutputSection",
    "ResizeSection",
    "Rule",
    "RuleSet",
    "compile_glob",
    "load_rule_file",
    "load_rules",
    "parse_rule",
    "rule_files",
]

DEFAULT_RULE = "default"
# Bumped when the meaning of a field changes, so that old fingerprints stop matching.
_FINGERPRINT_SALT = "sinkwatch-rule-1"
# UTF-8, with or without the byte-order mark some Windows editors write (TOML itself has no place for it).
_ENCODING = "utf-8-sig"
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")  # fullmatch: "$" would let a final newline in


class Rule(StrictModel):
    """One rule file. Frozen, hashable by content, picklable (it travels to worker processes)."""

    name: str = DEFAULT_RULE
    description: str = ""
    match: Annotated[tuple[str, ...], Field(strict=False)] = ()
    priority: int = Field(0, ge=-1000, le=1000)
    resize: ResizeSection = ResizeSection()
    analysis: AnalysisSection = AnalysisSection()
    mask: MaskSection = MaskSection()
    blur: BlurSection = BlurSection()
    highlights: HighlightsSection = HighlightsSection()
    output: OutputSection = OutputSection()

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError(f"must be 1-64 of a-z 0-9 . _ - starting with a letter or digit, got {value!r}")
        return value

    @field_validator("match")
    @classmethod
    def _globs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for index, glob in enumerate(value):
            try:
                compile_glob(glob)
            except ValueError as exc:
                raise FieldError(f"[{index}]", str(exc)) from None
        return value

    @cached_property
    def fingerprint(self) -> str:
        """Stable hash of everything that shapes the outputs (not description, match or priority).

        Kept once made: a frozen rule's outputs cannot change, and the daemon and each worker ask for it
        several times per image (a third of a millisecond each with cold caches).
        """
        content = self.model_dump(mode="json", exclude={"description", "match", "priority"})
        canonical = json.dumps([_FINGERPRINT_SALT, content], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def matches(self, relpath: str) -> bool:
        """Whether any of the ``match`` globs matches a watch-folder-relative path."""
        path = relpath.replace("\\", "/").lstrip("/")
        name = PurePosixPath(path).name
        return any(compile_glob(glob).fullmatch(path if "/" in glob else name) for glob in self.match)

    def to_params(self) -> PipelineParams:
        """The core parameters this rule stands for."""
        r, a, m, b, h, o = self.resize, self.analysis, self.mask, self.blur, self.highlights, self.output
        return PipelineParams(
            resize=ResizeParams(
                width=r.width, height=r.height, mode=r.mode, orientation=r.orientation,
                square=r.square, multiple=r.multiple, pad=r.pad,
            ),
            analysis=AnalysisParams(
                sigma=a.sigma, window=a.window, scale=a.scale, texture=a.texture,
                texture_window=a.texture_window, fill_low=a.fill_low, fill_high=a.fill_high,
            ),
            mask=MaskParams(
                mode=m.mode, threshold=m.threshold, percentile=m.percentile, speckle=m.speckle,
                min_area=m.min_area, dilate=m.dilate, feather=m.feather, max_coverage=m.max_coverage,
                blots=m.blots, blot_size=m.blot_size, blot_keep=m.blot_keep, blot_min_area=m.blot_min_area,
            ),
            blur=BlurParams(mode=b.mode, sigma=b.sigma, strength=b.strength, target=b.target),
            highlights=HighlightParams(
                enabled=h.enabled, level=h.level, max_area=h.max_area, contrast=h.contrast,
                radius=h.radius, strength=h.strength,
            ),
            heatmap=HeatmapParams(
                style=o.heatmap, colormap=o.colormap, gamma=o.gamma, halo=o.halo,
                outline=o.outline, outline_color=o.outline_color,
            ),
        )  # fmt: skip


@dataclass(frozen=True)
class RuleSet:
    """The rules of one folder (or the shipped presets), with selection by path."""

    rules: tuple[Rule, ...]
    source: str = "presets"

    def __post_init__(self) -> None:
        if DEFAULT_RULE not in self.names:
            raise RuleError(
                f"no rule named {DEFAULT_RULE!r} (every rule folder needs one; copy the shipped default.toml)",
                file=self.source,
                field="name",
            )

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(rule.name for rule in self.rules)

    @property
    def fingerprint(self) -> str:
        """Hash of the whole set, selection included (names, globs, priorities, contents)."""
        parts = [(rule.name, rule.fingerprint, list(rule.match), rule.priority) for rule in self.rules]
        return hashlib.sha256(json.dumps(sorted(parts)).encode()).hexdigest()[:16]

    def get(self, name: str) -> Rule:
        for rule in self.rules:
            if rule.name == name:
                return rule
        raise KeyError(name)

    def select(self, relpath: str) -> Rule:
        """The highest-priority rule whose globs match ``relpath`` (ties by name), else ``default``."""
        matching = [rule for rule in self.rules if rule.matches(relpath)]
        if not matching:
            return self.get(DEFAULT_RULE)
        return min(matching, key=lambda rule: (-rule.priority, rule.name))


def load_rule_file(path: str | Path) -> Rule:
    """Read and validate one rule file; any problem is a :class:`RuleError` naming file and field."""
    return parse_rule(_read(Path(path), str(path)), file=str(path))


def parse_rule(text: str, *, file: str) -> Rule:
    """Validate the TOML text of one rule; ``file`` names it in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RuleError(f"not valid TOML: {exc}", file=file) from exc
    try:
        return Rule.model_validate(data)
    except ValidationError as exc:
        raise rule_error(exc, file, model=Rule) from None


def load_rules(directory: Path | None = None) -> RuleSet:
    """Every ``*.toml`` rule of a folder, or the shipped presets when ``directory`` is None."""
    if directory is None:
        folder: Traversable = resources.files("rules")
        return _rule_set(_toml_files(folder), source="presets")
    if not directory.is_dir():
        raise RuleError("rules folder does not exist or is not a folder", file=directory)
    return _rule_set(_toml_files(directory), source=str(directory))


def rule_files(directory: Path | None = None) -> list[tuple[str, str | RuleError]]:
    """``(label, text)`` of each rule file of a folder (or the presets), for checking them one by one; the
    text of a file that cannot be read is the error saying so (it must not hide the others)."""
    folder: Traversable | Path = resources.files("rules") if directory is None else directory
    if directory is not None and not directory.is_dir():
        raise RuleError("rules folder does not exist or is not a folder", file=directory)
    files: list[tuple[str, str | RuleError]] = []
    for entry, label in _rule_entries(folder):
        try:
            files.append((label, _read(entry, label)))
        except RuleError as exc:
            files.append((label, exc))
    return files


def is_rule_file(name: str) -> bool:
    """A rule file's name: ``*.toml``, not hidden (an editor's lock file ``.#x.toml``, macOS's ``._x.toml``)."""
    return name.endswith(".toml") and not name.startswith(".")


def _toml_files(folder: Traversable | Path) -> Iterable[tuple[str, str]]:
    for entry, label in _rule_entries(folder):
        yield label, _read(entry, label)


def _rule_entries(folder: Traversable | Path) -> list[tuple[Traversable | Path, str]]:
    """The rule files of a folder by name, each with the label that names it in messages."""
    try:
        entries = sorted((entry for entry in folder.iterdir() if is_rule_file(entry.name)), key=lambda e: e.name)
    except OSError as exc:
        raise RuleError(f"cannot list the rules folder: {exc.strerror or exc}", file=str(folder)) from exc
    return [(entry, str(entry) if isinstance(entry, Path) else f"rules/{entry.name}") for entry in entries]


def _read(entry: Traversable | Path, label: str) -> str:
    try:
        # A FIFO (or a device) named *.toml would block the read for good, and the daemon with it.
        if isinstance(entry, Path) and not stat.S_ISREG(entry.stat().st_mode):
            raise RuleError("cannot read rule file: not a regular file", file=label)
        return entry.read_text(encoding=_ENCODING)
    except OSError as exc:
        raise RuleError(f"cannot read rule file: {exc.strerror or exc}", file=label) from exc
    except UnicodeDecodeError as exc:
        raise RuleError(f"cannot read rule file: not UTF-8 text ({exc.reason})", file=label) from exc


def _rule_set(files: Iterable[tuple[str, str]], *, source: str) -> RuleSet:
    rules: list[Rule] = []
    seen: dict[str, str] = {}
    for label, text in files:
        rule = parse_rule(text, file=label)
        if rule.name in seen:
            raise RuleError(f"duplicate rule name {rule.name!r} (also in {seen[rule.name]})", file=label, field="name")
        seen[rule.name] = label
        rules.append(rule)
    if not rules:
        raise RuleError("no rule files (*.toml) in the rules folder", file=source)
    return RuleSet(rules=tuple(rules), source=source)
