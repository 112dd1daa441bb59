"""Rule files: TOML, validated by frozen pydantic models, mapped onto core's parameters.

A rule is data. Each section (``resize``, ``analysis``, ``mask``, ``blur``,
``highlights``, ``output``) is one model whose fields mirror one core
dataclass; every field has a default, so a rule file states only what it
changes. Types are strict (``width = "832"`` or ``blots = "yes"`` is an
error, not a guess) and unknown keys are refused. Any problem raises
:class:`~service.errors.RuleError` naming the file, the field and what was
expected.

``match`` globs are matched against the path relative to the watch folder,
``/``-separated and case-insensitive: ``*`` and ``?`` stay inside one folder,
``**`` (a whole segment) spans any number of folders, ``[abc]`` / ``[!abc]``
are character classes. A glob without ``/`` matches the file name in any
folder. Selection takes the highest ``priority`` among the rules with a
matching glob (ties: by name), and the rule named ``default`` otherwise.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.blur import BlurParams
from core.frequency import AnalysisParams
from core.heatmap import HeatmapParams
from core.highlights import HighlightParams
from core.mask import MaskParams
from core.pipeline import PipelineParams
from core.resize import ResizeParams
from service.errors import RuleError

DEFAULT_RULE = "default"
# Bumped when the meaning of a field changes, so that old fingerprints stop matching.
_FINGERPRINT_SALT = "sinkwatch-rule-1"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")

Channel = Annotated[int, Field(ge=0, le=255)]
RGB = Annotated[tuple[Channel, Channel, Channel], Field(strict=False)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ResizeSection(_Section):
    width: int = Field(832, ge=16, le=8192)
    height: int = Field(480, ge=16, le=8192)
    mode: Literal["cover", "contain", "stretch"] = "cover"
    orientation: Literal["auto", "fixed"] = "auto"
    square: bool = False
    multiple: Literal[16, 32] = 16
    pad: RGB = (0, 0, 0)

    @model_validator(mode="after")
    def _aligned(self) -> ResizeSection:
        for name in ("width", "height"):
            value = getattr(self, name)
            if value % self.multiple:
                raise _FieldError(name, f"must be a multiple of {self.multiple} (resize.multiple), got {value}")
        return self


class AnalysisSection(_Section):
    sigma: float = Field(1.2, ge=0.3, le=10.0)
    window: int = Field(9, ge=1, le=255)
    scale: float = Field(24.0, gt=0.0, le=255.0)
    texture: bool = True
    texture_window: int = Field(21, ge=3, le=255)
    fill_low: float = Field(0.42, ge=0.0, le=1.0)
    fill_high: float = Field(0.60, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> AnalysisSection:
        if self.fill_low >= self.fill_high:
            raise _FieldError("fill_low", f"must be below fill_high ({self.fill_high}), got {self.fill_low}")
        return self


class MaskSection(_Section):
    mode: Literal["absolute", "percentile"] = "absolute"
    threshold: float = Field(0.18, ge=0.0, le=1.0)
    percentile: float = Field(90.0, ge=0.0, le=100.0)
    speckle: int = Field(2, ge=0, le=64)
    min_area: int = Field(256, ge=0)
    dilate: int = Field(4, ge=0, le=128)
    feather: float = Field(3.0, ge=0.0, le=128.0)
    max_coverage: float = Field(0.2, ge=0.0, le=1.0)
    blots: bool = True
    blot_size: int = Field(48, ge=4, le=1024)
    blot_keep: float = Field(0.6, gt=0.0, le=1.0)
    blot_min_area: int = Field(20000, ge=0)


class BlurSection(_Section):
    mode: Literal["gaussian", "target"] = "target"
    sigma: float = Field(1.2, ge=0.3, le=10.0)
    strength: float = Field(1.0, ge=0.0, le=1.0)
    target: float = Field(0.08, ge=0.0, le=1.0)


class HighlightsSection(_Section):
    enabled: bool = True
    level: int = Field(235, ge=0, le=255)
    max_area: int = Field(120, ge=1)
    contrast: int = Field(50, ge=0, le=255)
    radius: int = Field(5, ge=1, le=64)
    strength: float = Field(0.6, ge=0.0, le=1.0)


class OutputSection(_Section):
    format: Literal["png"] = "png"
    heatmap: Literal["glow", "colormap"] = "glow"
    colormap: Literal["inferno", "magma", "viridis", "turbo"] = "inferno"
    gamma: float = Field(0.8, ge=0.1, le=4.0)
    halo: float = Field(0.35, ge=0.0, le=2.0)
    outline: bool = True
    outline_color: RGB = (0, 255, 96)
    keep_generator_metadata: bool = False
    background: RGB = (0, 0, 0)


class Rule(_Section):
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
        if not _NAME.match(value):
            raise ValueError(f"must be 1-64 of a-z 0-9 . _ - starting with a letter or digit, got {value!r}")
        return value

    @field_validator("match")
    @classmethod
    def _globs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for index, glob in enumerate(value):
            try:
                compile_glob(glob)
            except ValueError as exc:
                raise _FieldError(f"[{index}]", str(exc)) from None
        return value

    @property
    def fingerprint(self) -> str:
        """Stable hash of everything that shapes the outputs (not description, match or priority)."""
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
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise RuleError(f"cannot read rule file: {exc.strerror or exc}", file=path) from exc
    except UnicodeDecodeError as exc:
        raise RuleError(f"not UTF-8 text: {exc.reason}", file=path) from exc
    return parse_rule(text, file=str(path))


def parse_rule(text: str, *, file: str) -> Rule:
    """Validate the TOML text of one rule; ``file`` names it in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RuleError(f"not valid TOML: {exc}", file=file) from exc
    try:
        return Rule.model_validate(data)
    except ValidationError as exc:
        raise _rule_error(exc, file) from None


def load_rules(directory: Path | None = None) -> RuleSet:
    """Every ``*.toml`` rule of a folder, or the shipped presets when ``directory`` is None."""
    if directory is None:
        folder: Traversable = resources.files("rules")
        return _rule_set(_toml_files(folder), source="presets")
    if not directory.is_dir():
        raise RuleError("rules folder does not exist or is not a folder", file=directory)
    return _rule_set(_toml_files(directory), source=str(directory))


def rule_files(directory: Path | None = None) -> list[tuple[str, str]]:
    """``(label, text)`` of each rule file of a folder (or the presets), for checking them one by one."""
    if directory is None:
        return [(label, text) for label, text in _toml_files(resources.files("rules"))]
    if not directory.is_dir():
        raise RuleError("rules folder does not exist or is not a folder", file=directory)
    return list(_toml_files(directory))


@lru_cache(maxsize=1024)
def compile_glob(glob: str) -> re.Pattern[str]:
    """The regular expression of a ``match`` glob (see the module docstring); ValueError if malformed."""
    if not glob:
        raise ValueError("a glob must not be empty")
    if "\\" in glob:
        raise ValueError(f"use '/' between folders, not '\\\\': {glob!r}")
    if glob.startswith("/"):
        raise ValueError(f"globs are relative to the watch folder, not absolute: {glob!r}")
    segments = glob.split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        raise ValueError(f"empty, '.' or '..' folder in glob {glob!r}")
    parts: list[str] = []
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == "**":
            parts.append(".*" if last else "(?:[^/]+/)*")
            continue
        if "**" in segment:
            raise ValueError(f"'**' must be a whole folder name (as in 'a/**/b'): {glob!r}")
        parts.append(_segment_regex(segment, glob) + ("" if last else "/"))
    return re.compile("".join(parts), re.IGNORECASE)


def _segment_regex(segment: str, glob: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(segment):
        char = segment[i]
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = segment.find("]", i + 2 if segment[i + 1 : i + 2] in ("!", "]") else i + 1)
            if end < 0:
                raise ValueError(f"unclosed '[' in glob {glob!r}")
            body = segment[i + 1 : end]
            negate = body.startswith("!")
            body = body[1:] if negate else body
            if not body:
                raise ValueError(f"empty character class in glob {glob!r}")
            out.append("[" + ("^" if negate else "") + body.replace("\\", "\\\\").replace("^", "\\^") + "]")
            i = end
        elif char == "]":
            raise ValueError(f"unmatched ']' in glob {glob!r}")
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)


class _FieldError(ValueError):
    """A validator's complaint about a field other than the one it runs on."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")


def _toml_files(folder: Traversable | Path) -> Iterable[tuple[str, str]]:
    entries = sorted((entry for entry in folder.iterdir() if entry.name.endswith(".toml")), key=lambda e: e.name)
    for entry in entries:
        label = str(entry) if isinstance(entry, Path) else f"rules/{entry.name}"
        try:
            text = entry.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RuleError(f"cannot read rule file: {exc}", file=label) from exc
        yield label, text


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


def _rule_error(exc: ValidationError, file: str) -> RuleError:
    """One RuleError for all problems of a file; ``field`` is the first one's dotted path."""
    (field, text), *others = [_describe(error) for error in exc.errors()]
    message = "; ".join([text, *(f"{other}: {more}" for other, more in others)])
    return RuleError(message, file=file, field=field)


_WORDING = (
    ("Input should be", "expected"),
    ("a valid tuple", "an array"),
    ("a valid integer", "an integer"),
    ("a valid number", "a number"),
    ("a valid boolean", "true or false"),
    ("a valid string", "a string"),
    ("less than or equal to", "at most"),
    ("greater than or equal to", "at least"),
)


def _describe(error: Mapping[str, Any]) -> tuple[str, str]:
    loc = [str(part) if isinstance(part, str) else f"[{part}]" for part in error["loc"]]
    field = ".".join(loc).replace(".[", "[")
    kind = error["type"]
    if kind == "value_error":
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, _FieldError):
            inner, _, text = str(cause).partition(": ")
            if inner.startswith("["):
                return field + inner, text
            return (f"{field}.{inner}" if field else inner), text
        return field, str(cause)
    if kind == "extra_forbidden":
        allowed = _allowed_keys(error["loc"][:-1])
        return field, f"unknown key; expected one of: {', '.join(allowed)}"
    message = str(error["msg"])
    for before, after in _WORDING:
        message = message.replace(before, after)
    given = error.get("input")
    shown = "a table" if isinstance(given, dict) else f"{type(given).__name__} {given!r}"
    return field, f"{message}, got {shown}"


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Rule
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return list(model.model_fields)
