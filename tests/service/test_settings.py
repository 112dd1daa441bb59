"""Settings: defaults < --config TOML < SINKWATCH_* environment < flags; errors name the field."""

from __future__ import annotations

import argparse
import io
import os
import re
from pathlib import Path

import pytest

from service.errors import ConfigError
from service.logs import configure_logging
from service.selection import Selection
from service.settings import Settings, add_flags, load_settings, settings_from_args, warn_unknown_environment


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SINKWATCH_* variable of the machine running the tests may leak in."""
    for name in list(os.environ):
        if name.startswith("SINKWATCH_"):
            monkeypatch.delenv(name)


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sinkwatch.toml"
    path.write_text(text, encoding="utf-8")
    return path


def parse(*argv: str) -> Settings:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    return settings_from_args(parser.parse_args(argv))


# -- precedence -------------------------------------------------------------------


def test_it_starts_with_no_configuration_at_all() -> None:
    settings = load_settings()
    assert settings.queue == settings.queue_folder == Path("queue")
    assert settings.comfyui_input is None and settings.comfyui_url is None and settings.comfyui_workflow is None
    assert (settings.comfyui_subfolder, settings.comfyui_timeout) == ("sinkwatch", 10.0)


def test_each_source_overrides_the_one_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = config(
        tmp_path,
        'workers = 3\npoll_interval = 2.0\ncomfyui_timeout = 5.0\ncomfyui_subfolder = "from-file"\n'
        'comfyui_url = "http://127.0.0.1:1111"\n',
    )
    monkeypatch.setenv("SINKWATCH_POLL_INTERVAL", "3.0")
    monkeypatch.setenv("SINKWATCH_COMFYUI_TIMEOUT", "6.0")
    monkeypatch.setenv("SINKWATCH_COMFYUI_URL", "http://127.0.0.1:2222")
    settings = load_settings(config_file=path, flags={"poll_interval": 4.0})

    assert settings.workers == 3, "file over default"
    assert settings.comfyui_subfolder == "from-file", "file over default"
    assert settings.comfyui_timeout == 6.0, "environment over file"
    assert settings.comfyui_url == "http://127.0.0.1:2222", "environment over file"
    assert settings.poll_interval == 4.0, "flag over environment"
    assert settings.settle_seconds == 1.0, "default where nobody says otherwise"


def test_flags_parsed_from_the_command_line_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = config(tmp_path, '[sinkwatch]\ncomfyui-url = "http://127.0.0.1:1111"\ncomfyui-timeout = 5\n')
    monkeypatch.setenv("SINKWATCH_COMFYUI_URL", "http://127.0.0.1:2222")
    settings = parse(
        "--config", str(path),
        "--comfyui-url", "http://127.0.0.1:3333",
        "--comfyui-workflow", str(tmp_path / "wf.json"),
        "--comfyui-subfolder", "",
    )  # fmt: skip
    assert settings.comfyui_url == "http://127.0.0.1:3333"
    assert settings.comfyui_timeout == 5.0, "a [sinkwatch] table with dashed keys reads like flat keys"
    assert settings.comfyui_workflow == tmp_path / "wf.json"
    assert settings.comfyui_subfolder == "", "empty: ComfyUI's input/ itself"


def test_unset_flags_leave_the_lower_sources_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SINKWATCH_COMFYUI_SUBFOLDER", "farm")
    assert parse("--workers", "2").comfyui_subfolder == "farm"


# -- --comfyui-input ------------------------------------------------------------------


def test_comfyui_input_is_the_queue_folder(tmp_path: Path) -> None:
    settings = parse("--comfyui-input", str(tmp_path / "ComfyUI" / "input"))
    assert settings.queue_folder == tmp_path / "ComfyUI" / "input"
    assert settings.resolved_state_dir == tmp_path / "ComfyUI" / "input" / ".sinkwatch" / "state"


def test_comfyui_input_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SINKWATCH_COMFYUI_INPUT", str(tmp_path / "in"))
    assert load_settings().queue_folder == tmp_path / "in"


def test_comfyui_input_and_the_same_queue_agree(tmp_path: Path) -> None:
    assert parse("--comfyui-input", str(tmp_path), "--queue", str(tmp_path)).queue_folder == tmp_path


def test_comfyui_input_and_a_different_queue_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"comfyui_input .* and queue .* name different folders"):
        parse("--comfyui-input", str(tmp_path / "a"), "--queue", str(tmp_path / "b"))


def test_comfyui_input_from_a_flag_beats_a_queue_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The Docker image (or a systemd unit) sets SINKWATCH_QUEUE; the README's compose example adds the flag.
    monkeypatch.setenv("SINKWATCH_QUEUE", "/data/queue")
    assert parse("--comfyui-input", str(tmp_path / "input")).queue_folder == tmp_path / "input"


def test_comfyui_input_from_the_environment_beats_a_queue_from_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SINKWATCH_COMFYUI_INPUT", str(tmp_path / "input"))
    path = config(tmp_path, 'queue = "/data/queue"\n')
    assert load_settings(config_file=path).queue_folder == tmp_path / "input"


@pytest.mark.parametrize(
    ("queue_from", "comfyui_from"),
    [("the environment", "the environment"), ("a flag", "the environment"), ("the config file", "the config file")],
)
def test_a_queue_at_the_same_or_a_higher_precedence_than_comfyui_input_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, queue_from: str, comfyui_from: str
) -> None:
    values = {"queue": str(tmp_path / "queue"), "comfyui_input": str(tmp_path / "input")}
    flags: dict[str, str] = {}
    lines = []
    for name, where in (("queue", queue_from), ("comfyui_input", comfyui_from)):
        if where == "a flag":
            flags[name] = values[name]
        elif where == "the environment":
            monkeypatch.setenv(f"SINKWATCH_{name.upper()}", values[name])
        else:
            lines.append(f'{name} = "{values[name]}"\n')
    path = config(tmp_path, "".join(lines))
    with pytest.raises(ConfigError) as caught:
        load_settings(config_file=path, flags=flags)
    message = str(caught.value)
    assert "name different folders" in message
    assert f"queue ({values['queue']}, from {queue_from}" in message, message
    assert f"comfyui_input ({values['comfyui_input']}, from {comfyui_from}" in message, message


def test_without_comfyui_input_the_queue_is_the_queue_folder(tmp_path: Path) -> None:
    settings = parse("--queue", str(tmp_path / "q"))
    assert settings.queue_folder == tmp_path / "q"
    assert settings.resolved_state_dir == tmp_path / "q" / ".sinkwatch" / "state"


# -- errors name the field --------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (("--comfyui-timeout", "0"), "comfyui_timeout"),
        (("--comfyui-timeout", "soon"), "comfyui_timeout"),
        (("--comfyui-url", "localhost:8188"), "comfyui_url"),
        (("--comfyui-url", "ftp://127.0.0.1"), "comfyui_url"),
        (("--comfyui-subfolder", "../models"), "comfyui_subfolder"),
        (("--comfyui-subfolder", "/abs"), "comfyui_subfolder"),
        (("--workers", "0"), "workers"),
    ],
)
def test_a_bad_flag_names_its_field(argv: tuple[str, ...], field: str) -> None:
    with pytest.raises(ConfigError, match=f"setting '{field}'"):
        parse(*argv)


def test_a_bad_url_says_what_a_url_must_look_like() -> None:
    with pytest.raises(ConfigError, match=r"http://host:8188") as caught:
        parse("--comfyui-url", "localhost:8188")
    assert "Value error" not in str(caught.value), "our own message, not pydantic's wrapping"


def test_a_bad_environment_variable_names_its_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SINKWATCH_COMFYUI_TIMEOUT", "-1")
    with pytest.raises(ConfigError, match="setting 'comfyui_timeout'"):
        load_settings()


@pytest.mark.parametrize(
    ("flags", "environment", "origin"),
    [
        ({}, {"SINKWATCH_WORKERS": "x"}, "(from SINKWATCH_WORKERS)"),
        ({"workers": 0}, {}, "(from --workers)"),
        ({"workers": 0}, {"SINKWATCH_WORKERS": "x"}, "(from --workers)"),
    ],
)
def test_a_bad_value_names_where_it_came_from_not_the_valid_config_file(
    flags: dict[str, object],
    environment: dict[str, str],
    origin: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    path = config(tmp_path, "workers = 2\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config_file=path, flags=flags)
    assert str(caught.value).startswith("setting 'workers': ") and str(caught.value).endswith(origin), caught.value


def test_sinkwatch_config_names_the_config_file_and_a_flag_beats_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restored_logging: None
) -> None:
    monkeypatch.setenv("SINKWATCH_CONFIG", str(config(tmp_path, "workers = 5\n")))
    assert parse().workers == 5
    other = tmp_path / "other.toml"
    other.write_text("workers = 6\n", encoding="utf-8")
    assert parse("--config", str(other)).workers == 6
    stream = io.StringIO()
    configure_logging(log_format="text", stream=stream)
    warn_unknown_environment({"SINKWATCH_CONFIG": "x.toml"})
    assert stream.getvalue() == "", "SINKWATCH_CONFIG is a setting"


def test_the_log_level_is_taken_in_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SINKWATCH_LOG_LEVEL", "warning")
    assert parse().log_level == "WARNING"
    assert parse("--log-level", "debug").log_level == "DEBUG"
    with pytest.raises(ConfigError, match="setting 'log_level'"):
        parse("--log-level", "verbose")


def test_a_misspelt_environment_variable_is_named_in_a_warning(restored_logging: None) -> None:
    stream = io.StringIO()
    configure_logging(log_format="text", stream=stream)
    warn_unknown_environment({"SINKWATCH_WORKER": "7", "SINKWATCH_WORKERS": "3", "PATH": "/bin", "OTHER_WORKER": "1"})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and "SINKWATCH_WORKER: no such setting; did you mean SINKWATCH_WORKERS?" in lines[0], lines


def test_a_bad_config_value_names_its_field_and_the_file(tmp_path: Path) -> None:
    path = config(tmp_path, 'comfyui_url = "not a url"\n')
    with pytest.raises(ConfigError, match=f"setting 'comfyui_url'.*config {re.escape(str(path))}"):
        load_settings(config_file=path)


def test_an_unknown_config_key_is_named(tmp_path: Path) -> None:
    path = config(tmp_path, 'comfyui_adress = "http://127.0.0.1:8188"\n')
    with pytest.raises(ConfigError, match="setting 'comfyui_adress'"):
        load_settings(config_file=path)


def test_a_workflow_without_a_comfyui_to_queue_it_on_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="comfyui_workflow needs comfyui_url"):
        parse("--comfyui-workflow", str(tmp_path / "wf.json"))


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = config(tmp_path, "comfyui_url = \n")
    with pytest.raises(ConfigError, match="invalid TOML") as caught:
        load_settings(config_file=path)
    assert caught.value.path == str(path)


def test_a_missing_config_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file") as caught:
        load_settings(config_file=tmp_path / "absent.toml")
    assert caught.value.path == str(tmp_path / "absent.toml")


# -- flags and help ------------------------------------------------------------------------


def test_every_comfyui_setting_is_a_flag_with_its_environment_variable_in_the_help() -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    text = " ".join(parser.format_help().split())
    for name in (
        "comfyui_input",
        "comfyui_url",
        "comfyui_workflow",
        "comfyui_subfolder",
        "comfyui_timeout",
        "comfyui_check_every",
        "comfyui_requeue_lost",
    ):
        assert "--" + name.replace("_", "-") in text
        assert f"SINKWATCH_{name.upper()}" in text
    assert "default: sinkwatch" in text and "default: 10.0" in text
    assert "shipped presets / under the queue" not in text, "an unset default is explained by the description"


# -- numbers that are not durations, and how the config file is read ------------------------------

FLOAT_SETTINGS = [name for name, field in Settings.model_fields.items() if field.annotation is float]


def test_the_float_settings_are_the_durations() -> None:
    assert set(FLOAT_SETTINGS) == {
        "poll_interval",
        "settle_seconds",
        "rescan_interval",
        "retry_base",
        "comfyui_timeout",
        "comfyui_check_every",
    }


def test_the_job_check_may_be_turned_off_but_not_made_negative() -> None:
    assert parse("--comfyui-check-every", "0").comfyui_check_every == 0.0
    assert parse().comfyui_check_every == 60.0
    with pytest.raises(ConfigError, match="setting 'comfyui_check_every'"):
        parse("--comfyui-check-every", "-1")


def test_lost_jobs_are_queued_again_only_when_asked_and_a_few_times_at_most() -> None:
    assert parse().comfyui_requeue_lost == 0
    comfyui = ("--comfyui-url", "http://127.0.0.1:8188", "--comfyui-workflow", "wf.json")
    assert parse(*comfyui, "--comfyui-requeue-lost", "3").comfyui_requeue_lost == 3
    for wrong in ("-1", "11", "1.5"):
        with pytest.raises(ConfigError, match="setting 'comfyui_requeue_lost'"):
            parse(*comfyui, "--comfyui-requeue-lost", wrong)
    with pytest.raises(ConfigError, match="comfyui_requeue_lost needs comfyui_workflow"):
        parse(*comfyui[:2], "--comfyui-requeue-lost", "1")
    with pytest.raises(ConfigError, match="comfyui_requeue_lost needs comfyui_check_every above 0"):
        parse(*comfyui, "--comfyui-requeue-lost", "1", "--comfyui-check-every", "0")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", FLOAT_SETTINGS)
def test_no_float_setting_takes_inf_or_nan_from_any_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    with pytest.raises(ConfigError, match=f"setting '{name}'"):
        parse(f"--{name.replace('_', '-')}={value}")  # "=": argparse reads a bare -inf as a flag
    with pytest.raises(ConfigError, match=f"setting '{name}'"):
        load_settings(config_file=config(tmp_path, f"{name} = {value}\n"))
    monkeypatch.setenv(f"SINKWATCH_{name.upper()}", value)
    with pytest.raises(ConfigError, match=f"setting '{name}'"):
        load_settings()


@pytest.mark.parametrize("name", ["watch", "queue", "rules", "state_dir", "comfyui_input", "comfyui_workflow"])
def test_an_empty_path_is_refused_not_taken_for_the_working_directory(tmp_path: Path, name: str) -> None:
    """`--watch "$DIR"` with DIR unset, or `rules = ""` in a config file: not ".", where sinkwatch would then
    watch, keep its ledger or read every TOML file (its own config among them) as a rule."""
    with pytest.raises(ConfigError, match=f"setting '{name}'.*empty"):
        parse(f"--{name.replace('_', '-')}", "")
    with pytest.raises(ConfigError, match=f"setting '{name}'.*empty"):
        load_settings(config_file=config(tmp_path, f'{name} = ""\n'))


@pytest.mark.parametrize("name", ["include", "ignore"])
def test_an_empty_glob_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match=f"setting '{name}'.*empty glob"):
        parse(f"--{name}", "")
    with pytest.raises(ConfigError, match=f"setting '{name}'.*empty glob"):
        load_settings(config_file=config(tmp_path, f'{name} = ["*.png", ""]\n'))


@pytest.mark.parametrize("name", FLOAT_SETTINGS)
def test_no_duration_is_longer_than_a_day(name: str) -> None:
    # 1e10 s is finite, but waiting that long raises OverflowError in the waiting thread.
    with pytest.raises(ConfigError, match=f"setting '{name}'.*86400"):
        parse("--" + name.replace("_", "-"), "1e10")
    assert getattr(parse("--" + name.replace("_", "-"), "86400"), name) == 86400.0


def test_a_config_file_saved_with_a_byte_order_mark_reads_like_any_other(tmp_path: Path) -> None:
    path = tmp_path / "sinkwatch.toml"
    path.write_bytes(b"\xef\xbb\xbf" + b"[sinkwatch]\nworkers = 3\npoll-interval = 2.5\n")
    settings = load_settings(config_file=path)
    assert (settings.workers, settings.poll_interval) == (3, 2.5)


def test_a_config_file_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "sinkwatch.toml"
    path.write_bytes(b'watch = "/srv/caf\xe9"\n')  # Latin-1
    with pytest.raises(ConfigError, match="not UTF-8") as caught:
        load_settings(config_file=path)
    assert caught.value.path == str(path)


@pytest.mark.parametrize(
    ("glob", "expected"),
    [
        ("[z-a]*.png", "reversed range 'z-a'"),
        ("shot[9-0].png", "reversed range '9-0'"),
        ("[Z-a]*.png", "reversed range 'z-a'"),  # matched lower-cased: 'z' > 'a'
        ("*.{png,jpg}", r'"\*\.png", "\*\.jpg"'),
        ("*.png,*.jpg", "looks like a list written as one glob"),  # the help's old look
        ("*.png, *.JPG", "looks like a list written as one glob"),
        (" *.jpg", "a space at an end"),
    ],
)
def test_an_include_or_ignore_glob_that_would_silently_match_nothing_is_refused(
    tmp_path: Path, glob: str, expected: str
) -> None:
    with pytest.raises(ConfigError, match=f"setting 'include'.*{expected}"):
        parse("--include", glob)
    with pytest.raises(ConfigError, match=f"setting 'ignore'.*{expected}"):
        load_settings(config_file=config(tmp_path, f"ignore = [{glob!r}]\n".replace("'", '"')))


def test_an_empty_include_list_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"setting 'include': no glob to include.*config"):
        load_settings(config_file=config(tmp_path, "include = []\n"))
    assert load_settings(config_file=config(tmp_path, "ignore = []\n")).ignore == ()


def test_include_and_ignore_keep_fnmatch_globs_that_mean_something(tmp_path: Path) -> None:
    globs = ("[a-z]*.PNG", "[!]]x.png", "[]x", "a[b", "**/*.webp", "[{]x[}].png", "*[,]*", "a cat, sitting_*.png")
    settings = parse(*[arg for glob in globs for arg in ("--include", glob)])
    assert settings.include == globs
    assert Selection(tmp_path, include=settings.include).relpath(tmp_path / "{x}.png") == "{x}.png"


# -- empty variables, mixed config files, the watch folder given ------------------------------


def test_an_empty_environment_variable_is_no_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    # `KEY=` in an env file unsets it; read as a path it would be the current directory.
    for name in ("STATE_DIR", "RULES", "WORKERS", "QUEUE", "COMFYUI_INPUT"):
        monkeypatch.setenv(f"SINKWATCH_{name}", "")
    settings = load_settings()
    assert settings.state_dir is None and settings.rules is None and settings.comfyui_input is None
    assert settings.queue_folder == Path("queue")
    assert settings.workers == Settings.model_fields["workers"].default


def test_top_level_keys_beside_a_sinkwatch_table_are_refused(tmp_path: Path) -> None:
    path = config(tmp_path, "workers = 1\n[sinkwatch]\nqueue_size = 3\n")
    with pytest.raises(ConfigError, match=r"both at top level and under \[sinkwatch\]; use one") as caught:
        load_settings(config_file=path)
    assert str(path) in str(caught.value)


def test_a_sinkwatch_table_beside_other_tables_is_refused_too(tmp_path: Path) -> None:
    path = config(tmp_path, "[sinkwatch]\nworkers = 1\n[other]\nqueue_size = 3\n")
    with pytest.raises(ConfigError, match="use one"):
        load_settings(config_file=path)


@pytest.mark.parametrize("source", ["default", "flag", "environment", "config"])
def test_the_watch_folder_counts_as_given_from_any_source_but_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    flags = {"watch": "w"} if source == "flag" else {}
    if source == "environment":
        monkeypatch.setenv("SINKWATCH_WATCH", "w")
    path = config(tmp_path, 'watch = "w"\n' if source == "config" else "")
    assert load_settings(config_file=path, flags=flags).watch_given is (source != "default")
