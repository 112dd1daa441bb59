"""Daemon settings: embedded defaults < ``--config`` TOML < ``SINKWATCH_*`` < CLI flags.

One ``BaseSettings`` class; every field has a default and a description, which
feed ``--help``, the flags and the README table.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from service.errors import ConfigError

DEFAULT_METRICS_PORT = 18416
DEFAULT_INCLUDE = ("*.png", "*.jpg", "*.jpeg", "*.webp", "*.bmp", "*.tif", "*.tiff")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SINKWATCH_", extra="forbid", frozen=True)

    watch: Path = Field(Path("watch"), description="Folder the image generator writes to (never modified).")
    queue: Path = Field(
        Path("queue"), description="I2V queue folder the cleaned frames are published to; created if missing."
    )
    rules: Path | None = Field(None, description="Folder of rule files (TOML); default: the shipped presets.")
    state_dir: Path | None = Field(None, description="Ledger and lock folder; default: QUEUE/.sinkwatch/state.")
    workers: int = Field(os.cpu_count() or 1, ge=1, le=256, description="Worker processes (default: one per core).")
    polling: bool = Field(
        False, description="Poll the watch folder instead of inotify (network mounts, Docker Desktop)."
    )
    poll_interval: float = Field(1.0, gt=0, description="Seconds between polls with --polling.")
    recursive: bool = Field(False, description="Also watch subfolders of the watch folder.")
    include: tuple[str, ...] = Field(DEFAULT_INCLUDE, description="Globs of file names to process (case-insensitive).")
    ignore: tuple[str, ...] = Field(
        (),
        description="Extra globs to ignore (hidden files, *.tmp, *.part, .DS_Store, Thumbs.db and @eaDir always are).",
    )
    settle_seconds: float = Field(
        1.0, ge=0, description="How long size and mtime must hold before a created/moved file counts as finished."
    )
    rescan_interval: float = Field(
        60.0, gt=0, description="Seconds between reconciliation scans (inotify drops events on overflow)."
    )
    queue_size: int = Field(256, ge=1, description="Bound of the work queue; beyond it events wait for the next scan.")
    max_attempts: int = Field(
        5, ge=1, description="Tries for a transient failure (incomplete file, full disk) before giving up."
    )
    retry_base: float = Field(2.0, gt=0, description="First retry delay in seconds; doubles each attempt.")
    max_bytes: int = Field(256 * 1024 * 1024, ge=1, description="Largest source file accepted, in bytes.")
    max_pixels: int = Field(
        100_000_000, ge=1, description="Largest source image accepted, in pixels (decompression-bomb guard)."
    )
    metrics_host: str = Field("127.0.0.1", description="Address of the /metrics, /healthz, /readyz listener.")
    metrics_port: int = Field(DEFAULT_METRICS_PORT, ge=0, le=65535, description="Port of that listener (0: disabled).")
    log_format: Literal["auto", "text", "json"] = Field(
        "auto", description="Log lines: text on a terminal, JSON lines otherwise (auto)."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Lowest log level written.")

    @property
    def resolved_state_dir(self) -> Path:
        return self.state_dir if self.state_dir is not None else self.queue / ".sinkwatch" / "state"


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            values = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror}", path=path) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", path=path) from exc
    section = values.get("sinkwatch", values)
    return {key.replace("-", "_"): value for key, value in section.items()}


def load_settings(*, config_file: Path | None = None, flags: Mapping[str, Any] | None = None) -> Settings:
    """Build the settings with their full precedence; errors name the field."""
    file_values = read_config_file(config_file) if config_file is not None else {}

    class FileSettings(Settings):
        # The config file is only known at run time, so its source is bound here.
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, InitSettingsSource(settings_cls, file_values))

    try:
        return FileSettings(**dict(flags or {}))
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        source = f" (config {config_file})" if config_file else ""
        raise ConfigError(f"setting {field!r}: {first['msg']}{source}") from exc


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, help from its description; unset flags stay unset."""
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="TOML config file (keys as below; optional [sinkwatch] table)."
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"SINKWATCH_{name.upper()}"
        text = f"{field.description} [{env}; default: {_show_default(field.default)}]"
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": text}
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif name in ("include", "ignore"):
            parser.add_argument(flag, action="append", metavar="GLOB", **kwargs)
        else:
            parser.add_argument(flag, metavar=name.split("_")[-1].upper(), **kwargs)


def settings_from_args(args: argparse.Namespace) -> Settings:
    flags = {name: getattr(args, name) for name in Settings.model_fields if hasattr(args, name)}
    return load_settings(config_file=getattr(args, "config", None), flags=flags)


def _show_default(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return "shipped presets / under the queue" if value is None else str(value)
