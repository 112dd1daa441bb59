"""The sections of a rule file: one frozen pydantic model per core dataclass.

Each section (``resize``, ``analysis``, ``mask``, ``blur``, ``highlights``,
``output``) mirrors the fields of one core parameter dataclass; every field
has a default, so a rule file states only what it changes. Kept apart from
:class:`service.rules.Rule`, which assembles them, maps them onto core's
parameters and selects rules by path.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.rule_errors import FieldError

Channel = Annotated[int, Field(ge=0, le=255)]
RGB = Annotated[tuple[Channel, Channel, Channel], Field(strict=False)]


class StrictModel(BaseModel):
    """Frozen, strictly typed, unknown keys refused: ``width = "832"`` is an error, not a guess.

    TOML has ``inf`` and ``nan``; no rule field means either, and they would reach
    the pipeline (and the scores) unchecked, so they are refused too.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class ResizeSection(StrictModel):
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
                raise FieldError(name, f"must be a multiple of {self.multiple} (resize.multiple), got {value}")
        return self


class AnalysisSection(StrictModel):
    sigma: float = Field(1.2, ge=0.3, le=10.0)
    window: int = Field(9, ge=1, le=255)
    # Grey levels that map to 1.0: below one grey level the map is noise (and tiny values overflow to NaN).
    scale: float = Field(24.0, ge=1.0, le=255.0)
    texture: bool = True
    texture_window: int = Field(21, ge=3, le=255)
    fill_low: float = Field(0.42, ge=0.0, le=1.0)
    fill_high: float = Field(0.60, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> AnalysisSection:
        if self.fill_low >= self.fill_high:
            raise FieldError("fill_low", f"must be below fill_high ({self.fill_high}), got {self.fill_low}")
        return self


class MaskSection(StrictModel):
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


class BlurSection(StrictModel):
    mode: Literal["gaussian", "target"] = "target"
    sigma: float = Field(1.2, ge=0.3, le=10.0)
    strength: float = Field(1.0, ge=0.0, le=1.0)
    target: float = Field(0.08, ge=0.0, le=1.0)


class HighlightsSection(StrictModel):
    enabled: bool = True
    level: int = Field(235, ge=0, le=255)
    max_area: int = Field(120, ge=1)
    contrast: int = Field(50, ge=0, le=255)
    radius: int = Field(5, ge=1, le=64)
    strength: float = Field(0.6, ge=0.0, le=1.0)


class OutputSection(StrictModel):
    format: Literal["png"] = "png"
    heatmap: Literal["glow", "colormap"] = "glow"
    colormap: Literal["inferno", "magma", "viridis", "turbo"] = "inferno"
    gamma: float = Field(0.8, ge=0.1, le=4.0)
    halo: float = Field(0.35, ge=0.0, le=2.0)
    outline: bool = True
    outline_color: RGB = (0, 255, 96)
    keep_generator_metadata: bool = False
    background: RGB = (0, 0, 0)
