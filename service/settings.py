"""Daemon settings: embedded defaults < ``--config`` TOML < ``SINKWATCH_*`` < CLI flags.

One ``BaseSettings`` class; every field has a default and a description, which
feed ``--help``, the flags and the README table.
"""

from __future__ import annotations

import argparse
import difflib
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from loguru import logger
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from service.comfyui import DEFAULT_SUBFOLDER, ComfyClient, checked_subfolder
from service.errors import ConfigError
from service.logs import configure_logging
from service.made_from_frame import FrameRefs
from service.rule_globs import check_name_glob

ENV_PREFIX = "SINKWATCH_"
# The config file, when no --config is given (a container's environment).
CONFIG_ENV = f"{ENV_PREFIX}CONFIG"
DEFAULT_METRICS_PORT = 18416
DEFAULT_INCLUDE = ("*.png", "*.jpg", "*.jpeg", "*.webp", "*.bmp", "*.tif", "*.tiff")
# Upper bound of every duration: longer is a typo, and a wait beyond what the platform's clock holds
# (about 1e10 s, or inf) raises OverflowError inside the thread that waits, killing it.
LONGEST_SECONDS = 86400.0
# UTF-8, with or without the byte-order mark some Windows editors write.
CONFIG_ENCODING = "utf-8-sig"


class Settings(BaseSettings):
    # No setting means inf or nan (TOML, the environment and flags all spell them). An empty variable
    # (`KEY=` in an env file, the usual way to unset one) is no setting, not the current directory.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="forbid", frozen=True, allow_inf_nan=False
    )

    watch: Path = Field(
        Path("watch"),
        description=(
            "Folder the image generator writes to (never modified; only the default is created if missing, "
            "a missing folder given is waited for)."
        ),
    )
    queue: Path = Field(
        Path("queue"), description="I2V queue folder the cleaned frames are published to; created if missing."
    )
    rules: Path | None = Field(None, description="Folder of rule files (TOML); default: the shipped presets.")
    state_dir: Path | None = Field(None, description="Ledger and lock folder; default: QUEUE/.sinkwatch/state.")
    workers: int = Field(os.cpu_count() or 1, ge=1, le=256, description="Worker processes (default: one per core).")
    polling: bool = Field(
        False, description="Poll the watch folder instead of inotify (network mounts, Docker Desktop)."
    )
    poll_interval: float = Field(1.0, gt=0, le=LONGEST_SECONDS, description="Seconds between polls with --polling.")
    recursive: bool = Field(False, description="Also watch subfolders of the watch folder.")
    include: tuple[str, ...] = Field(
        DEFAULT_INCLUDE, description="Globs of file names to process (case-insensitive; the flag once per glob)."
    )
    ignore: tuple[str, ...] = Field(
        (),
        description="Extra globs to ignore (hidden files, *.tmp, *.part, .DS_Store, Thumbs.db and @eaDir always are).",
    )
    settle_seconds: float = Field(
        1.0,
        ge=0,
        le=LONGEST_SECONDS,
        description="How long size and mtime must hold before a created/moved file counts as finished.",
    )
    rescan_interval: float = Field(
        60.0,
        gt=0,
        le=LONGEST_SECONDS,
        description="Seconds between reconciliation scans (inotify drops events on overflow).",
    )
    forget_after_days: int = Field(
        30,
        ge=0,
        description=(
            "Days a source may be gone from the watch folder before the ledger forgets it (0: never); "
            "back after that, its outputs still in the queue are kept."
        ),
    )
    queue_size: int = Field(256, ge=1, description="Bound of the work queue; beyond it events wait for the next scan.")
    max_attempts: int = Field(
        5,
        ge=1,
        description=(
            "Tries for an incomplete file, or an image that kills its worker or the whole service, before "
            "it is rejected (a full or read-only queue is retried until it recovers)."
        ),
    )
    retry_base: float = Field(
        2.0, gt=0, le=LONGEST_SECONDS, description="First retry delay in seconds; doubles each attempt."
    )
    max_bytes: int = Field(256 * 1024 * 1024, ge=1, description="Largest source file accepted, in bytes.")
    max_pixels: int = Field(
        100_000_000, ge=1, description="Largest source image accepted, in pixels (decompression-bomb guard)."
    )
    metrics_host: str = Field("127.0.0.1", description="Address of the /metrics, /healthz, /readyz listener.")
    metrics_port: int = Field(DEFAULT_METRICS_PORT, ge=0, le=65535, description="Port of that listener (0: disabled).")
    log_format: Literal["auto", "text", "json"] = Field(
        "auto", description="Log lines: text on a terminal, JSON lines otherwise (auto)."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Lowest log level written (any case)."
    )
    comfyui_input: Path | None = Field(
        None,
        description="ComfyUI's input/ folder: publish the frames there, in place of --queue (default: use --queue).",
    )
    comfyui_url: str | None = Field(
        None,
        description="Also upload every frame to this ComfyUI, e.g. http://host:8188 (default: off).",
    )
    comfyui_workflow: Path | None = Field(
        None,
        description="API-format workflow JSON to queue on that ComfyUI per uploaded frame (needs --comfyui-url).",
    )
    comfyui_subfolder: str = Field(
        DEFAULT_SUBFOLDER,
        description=(
            "Subfolder of ComfyUI's input/ the frames are uploaded into (empty: top level, where nothing is "
            "overwritten). Give each sinkwatch feeding one ComfyUI its own."
        ),
    )
    comfyui_timeout: float = Field(
        10.0, gt=0, le=LONGEST_SECONDS, description="Seconds one request to ComfyUI may take, all of it."
    )
    comfyui_check_every: float = Field(
        60.0,
        ge=0,
        le=LONGEST_SECONDS,
        description=(
            "Seconds between two looks at ComfyUI's queue and history for the video jobs queued on it, to tell "
            "the lost and failed ones (`run` with --comfyui-workflow; 0: never)."
        ),
    )
    comfyui_requeue_lost: int = Field(
        0,
        ge=0,
        le=10,
        description=(
            "Times the video job of one frame is queued again when ComfyUI loses it (a restart, a delete), at most "
            "10; 0: lost jobs are only reported. Needs --comfyui-workflow and the looks of --comfyui-check-every."
        ),
    )

    @field_validator("include", "ignore")
    @classmethod
    def _check_globs(cls, globs: tuple[str, ...]) -> tuple[str, ...]:
        for glob in globs:
            if not glob:
                raise ValueError("an empty glob matches no file")
            check_name_glob(glob)
        return globs

    @field_validator("watch", "queue", "rules", "state_dir", "comfyui_input", "comfyui_workflow", mode="before")
    @classmethod
    def _no_empty_path(cls, value: object) -> object:
        # Path("") is the working directory: an unset shell variable (`--watch "$DIR"`) must not mean that.
        if isinstance(value, str) and not value.strip():
            raise ValueError("empty; give a path, or leave the setting out for its default")
        return value

    @field_validator("include")
    @classmethod
    def _check_include(cls, globs: tuple[str, ...]) -> tuple[str, ...]:
        if not globs:
            raise ValueError("no glob to include: sinkwatch would take no file")
        return globs

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, level: object) -> object:
        return level.upper() if isinstance(level, str) else level

    @field_validator("comfyui_url")
    @classmethod
    def _check_comfyui_url(cls, url: str | None) -> str | None:
        if url is not None:
            _comfy_check(lambda: ComfyClient(url))
        return url

    @field_validator("comfyui_subfolder")
    @classmethod
    def _check_comfyui_subfolder(cls, subfolder: str) -> str:
        _comfy_check(lambda: ComfyClient("http://127.0.0.1", subfolder=subfolder))
        return subfolder

    @model_validator(mode="after")
    def _check_comfyui_combination(self) -> Settings:
        if self.comfyui_workflow is not None and self.comfyui_url is None:
            raise ValueError("comfyui_workflow needs comfyui_url (the ComfyUI to queue it on)")
        if self.comfyui_requeue_lost and self.comfyui_workflow is None:
            raise ValueError("comfyui_requeue_lost needs comfyui_workflow (the video jobs are its workflows)")
        if self.comfyui_requeue_lost and not self.comfyui_check_every:
            raise ValueError("comfyui_requeue_lost needs comfyui_check_every above 0 (its looks find the lost jobs)")
        return self

    @property
    def watch_given(self) -> bool:
        """Whether some source named the watch folder (not the embedded default)."""
        return "watch" in self.model_fields_set

    @property
    def queue_folder(self) -> Path:
        """Where frames are published: ComfyUI's input folder when given, else the queue."""
        return self.comfyui_input if self.comfyui_input is not None else self.queue

    @property
    def frame_refs(self) -> FrameRefs:
        """How ComfyUI names the frames: by their names in the queue when it is ComfyUI's input/ (given as such,
        or nothing is uploaded elsewhere), and by their uploads' names when they are uploaded."""
        return FrameRefs(
            top_level=self.comfyui_input is not None or self.comfyui_url is None,
            upload_folder=checked_subfolder(self.comfyui_subfolder) if self.comfyui_url is not None else None,
        )

    @property
    def resolved_state_dir(self) -> Path:
        return self.state_dir if self.state_dir is not None else self.queue_folder / ".sinkwatch" / "state"


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        values = tomllib.loads(path.read_text(encoding=CONFIG_ENCODING))
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror}", path=path) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text: {exc.reason} at byte {exc.start}", path=path) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", path=path) from exc
    section = values.get("sinkwatch", values)
    if not isinstance(section, dict):
        raise ConfigError("'sinkwatch' must be a table of settings ([sinkwatch])", path=path)
    if section is not values and len(values) > 1:
        # Either place alone is fine; with both, the top-level keys would be dropped without a word.
        raise ConfigError("settings both at top level and under [sinkwatch]; use one", path=path)
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

    flags = dict(flags or {})
    environment: dict[str, Any] = {}
    try:
        environment = EnvSettingsSource(Settings)()
        settings = FileSettings(**flags)
    except SettingsError as exc:
        # A list from SINKWATCH_* that is not JSON fails in pydantic-settings, before any validation.
        raise ConfigError(f"{exc}: lists are JSON, e.g. SINKWATCH_INCLUDE='[\"*.png\"]'") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        # A check across fields has no location; its message names the fields itself.
        where = f"setting {field!r}: " if field else "settings: "
        # Our own checks' messages, without pydantic's "Value error, " in front.
        message = str(first["ctx"]["error"]) if first["type"] == "value_error" else first["msg"]
        origin = _origin(str(first["loc"][0]) if first["loc"] else "", flags, environment, config_file)
        raise ConfigError(f"{where}{message}{origin}") from exc
    # Highest precedence first, as the names say.
    sources = {"a flag": flags, "the environment": environment, f"the config file {config_file}": file_values}
    _check_one_queue(settings, sources)
    return settings


def _origin(field: str, flags: Mapping[str, Any], environment: Mapping[str, Any], config_file: Path | None) -> str:
    """Where the failing value came from, the highest precedence first: what the user must change."""
    if field in flags:
        return f" (from --{field.replace('_', '-')})"
    if field in environment:
        return f" (from {ENV_PREFIX}{field.upper()})"
    return f" (config {config_file})" if config_file else ""


def warn_unknown_environment(environ: Mapping[str, str] = os.environ) -> None:
    """Log each SINKWATCH_* variable that is no setting: a misspelt one (say in the systemd unit's env file)
    would otherwise do nothing, silently. Called once logging is set up, so the line has the log's format."""
    known = [CONFIG_ENV, *(f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields)]
    for key in sorted(environ):
        if key.upper().startswith(ENV_PREFIX) and key.upper() not in known:
            close = difflib.get_close_matches(key.upper(), known, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            logger.warning("ignoring the environment variable {}: no such setting{}", key, hint)


def _check_one_queue(settings: Settings, sources: Mapping[str, Mapping[str, Any]]) -> None:
    """comfyui_input replaces a queue set at a lower precedence; at the same or a higher one, it conflicts.

    So `--comfyui-input DIR` beats the SINKWATCH_QUEUE of a Docker image or a systemd unit, while two
    different folders named at one level would leave one of them silently unused.
    """
    if settings.comfyui_input is None or settings.queue == settings.comfyui_input:
        return
    ranked = list(sources)
    comfyui_from = next(name for name in ranked if "comfyui_input" in sources[name])
    queue_from = next((name for name in ranked if "queue" in sources[name]), None)
    if queue_from is None or ranked.index(comfyui_from) < ranked.index(queue_from):
        return
    raise ConfigError(
        f"settings: comfyui_input ({settings.comfyui_input}, from {comfyui_from}) and queue ({settings.queue}, "
        f"from {queue_from}) name different folders; set only one of them"
    )


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, help from its description; unset flags stay unset."""
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"TOML config file (keys as below; optional [sinkwatch] table). [{CONFIG_ENV}]",
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"SINKWATCH_{name.upper()}"
        # An unset default (None) is explained by the description itself.
        shown = f"; default: {_show_default(field.default)}" if field.default is not None else ""
        text = f"{field.description} [{env}{shown}]"
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": text}
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif name in ("include", "ignore"):
            parser.add_argument(flag, action="append", metavar="GLOB", **kwargs)
        else:
            parser.add_argument(flag, metavar=name.split("_")[-1].upper(), **kwargs)


def logged_settings(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> Settings:
    """The settings of a command, and its log set up by them.

    The log is set up first as the flag or the environment asks (a config file may be what fails): an
    error in the settings is then a line of that log, a JSON line under systemd or Docker, not bare text.
    """
    asked = getattr(args, "log_format", None) or environ.get(f"{ENV_PREFIX}LOG_FORMAT", "")
    configure_logging(log_format=asked if asked in ("text", "json") else "auto")
    settings = settings_from_args(args, environ)
    configure_logging(log_format=settings.log_format, level=settings.log_level)
    return settings


def shared_settings(environ: Mapping[str, str] = os.environ) -> Settings:
    """The settings of a command that takes no setting flags (`rules check`, `analyze`): the environment and the
    config file SINKWATCH_CONFIG names, as `run` reads them, so that it looks at the daemon's rules."""
    return settings_from_args(argparse.Namespace(), environ)


def settings_from_args(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> Settings:
    flags = {name: getattr(args, name) for name in Settings.model_fields if hasattr(args, name)}
    config_file = getattr(args, "config", None)
    if config_file is None and environ.get(CONFIG_ENV):
        config_file = Path(environ[CONFIG_ENV])
    return load_settings(config_file=config_file, flags=flags)


def _show_default(value: object) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value)) or "none"
    return repr(value) if value == "" else str(value)


def _comfy_check(build: Callable[[], object]) -> None:
    """Run the ComfyUI client's own check of a value, as a validation error of the field."""
    try:
        build()
    except ConfigError as exc:
        raise ValueError(exc.message) from exc
