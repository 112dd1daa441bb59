"""service.folders: the start-up checks of the watch, queue and state folders."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import NoReturn

import pytest

from service.errors import ConfigError, PublishError
from service.folders import folder_problem, prepare_folders
from tests.service.test_publish import open_tmp, where_permissions_bind

__all__ = ["open_tmp"]  # the fixture, shared with test_publish


def test_the_default_watch_folder_is_created(tmp_path: Path) -> None:
    # `sinkwatch run` with no configuration at all must start.
    found = prepare_folders(tmp_path / "watch", tmp_path / "queue", None, if_watch_missing="create")
    assert found.watch.is_dir() and found.queue.is_dir() and found.state.is_dir()


def test_a_named_watch_folder_that_is_missing_is_not_created(tmp_path: Path) -> None:
    # Creating it would hide a typo in --watch behind a daemon that watches an empty folder forever.
    found = prepare_folders(tmp_path / "typo", tmp_path / "queue", None, if_watch_missing="wait")
    assert found.watch == (tmp_path / "typo").resolve()
    assert not found.watch.exists()
    assert found.queue.is_dir()


def test_refusing_a_missing_watch_folder_makes_no_folder_at_all(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="the watch folder does not exist") as caught:
        prepare_folders(tmp_path / "typo", tmp_path / "queue", None, if_watch_missing="refuse")
    assert "typo" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_a_watch_path_that_is_a_file_is_still_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder", encoding="utf-8")
    with pytest.raises(ConfigError, match="not a folder"):
        prepare_folders(tmp_path / "file", tmp_path / "queue", None, if_watch_missing="wait")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES])
def test_a_queue_that_cannot_be_written_yet_is_a_transient_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    # A full disk, or a mount that is read-only or not up at boot: restarting later may work.
    def refuse(**_kwargs: object) -> NoReturn:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    with pytest.raises(PublishError, match="the queue folder is not writable") as caught:
        prepare_folders(tmp_path / "watch", tmp_path / "queue", None, if_watch_missing="create")
    assert caught.value.transient
    assert caught.value.path == str((tmp_path / "queue").resolve())


def test_a_queue_below_a_file_is_a_configuration_error(tmp_path: Path) -> None:
    # No waiting makes a file a folder: exit 2, the unit does not restart it.
    (tmp_path / "file").write_text("x", encoding="utf-8")
    with pytest.raises(ConfigError, match="cannot create the queue folder") as caught:
        prepare_folders(tmp_path / "watch", tmp_path / "file" / "queue", None, if_watch_missing="create")
    assert not caught.value.transient


def test_a_watch_folder_behind_a_closed_parent_is_a_clear_configuration_error(open_tmp: Path) -> None:
    # A home folder of mode 700 (or /home under the unit's ProtectHome=): looking the watch folder up fails with
    # EACCES, which Path.exists() raised as a traceback.
    home = open_tmp / "home"
    (home / "me" / "output").mkdir(parents=True)
    home.chmod(0o700)
    queue = open_tmp / "queue"
    queue.mkdir(mode=0o777)
    queue.chmod(0o777)
    watch = home / "me" / "output"
    with pytest.raises(ConfigError, match=r"cannot reach the watch folder: Permission denied.*ProtectHome"):
        where_permissions_bind(open_tmp, lambda: prepare_folders(watch, queue, None, if_watch_missing="wait"))
    assert where_permissions_bind(open_tmp, lambda: folder_problem(watch)) == "cannot be reached (Permission denied)"
    assert folder_problem(watch) is None
    assert folder_problem(watch / "gone") == "does not exist"
