"""Which files are work: the same answer for an event (`relpath`) and for a scan."""

from __future__ import annotations

import fnmatch
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from loguru import logger

from service.selection import Selection
from service.settings import DEFAULT_INCLUDE
from tests.service.test_publish import open_tmp, where_permissions_bind

__all__ = ["open_tmp"]  # the fixture, shared with test_publish

ImageFile = Callable[[str], Path]


@pytest.fixture
def image(watch: Path) -> ImageFile:
    """Create a file at a path relative to the watch folder (selection never reads content)."""

    def make(relpath: str) -> Path:
        path = watch / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"selection judges names and file types only")
        return path

    return make


def selection(watch: Path, **kwargs: object) -> Selection:
    return Selection(watch, include=DEFAULT_INCLUDE, **kwargs)  # type: ignore[arg-type]


def scanned(sel: Selection) -> list[str]:
    """The keys a scan finds, checked against relpath and against the daemon's `scan_keys`."""
    keys = []
    paths = list(sel.scan())
    for path in paths:
        key = sel.relpath(path)
        assert key is not None, f"scan yielded {path}, which relpath rejects"
        keys.append(key)
    assert list(sel.scan_keys()) == [(key, str(path)) for key, path in zip(keys, paths, strict=True)]
    return keys


@pytest.mark.parametrize("name", ["a.png", "b.JPG", "c.Jpeg", "X.PNG", "d.webp", "e.bmp", "f.tif", "g.TIFF", "h i.png"])
def test_included_images_are_selected_whatever_the_case(watch: Path, image: ImageFile, name: str) -> None:
    path = image(name)
    assert selection(watch).relpath(path) == name


@pytest.mark.parametrize(
    "name",
    [
        ".hidden.png",
        "notes.txt",
        "a.png.tmp",
        "b.png.part",
        "C.PNG.TMP",
        ".DS_Store",
        "Thumbs.db",
        "thumbs.db",
        "png",
        "a.png~",
    ],
)
def test_litter_and_non_matching_names_are_not_selected(watch: Path, image: ImageFile, name: str) -> None:
    path = image(name)
    assert selection(watch).relpath(path) is None
    assert scanned(selection(watch)) == []


GLOBS = ("*.png", "[!x]?_*_*.JPG", "a[b-d]e.webp", "sub/*.tif", "[[]x].bmp")
NAMES = ["a.png", "A.PnG", "yb_1_2.jpg", "xb_1_2.jpg", "b_1_2.jpg", "ace.WEBP", "afe.webp", "[x].bmp", "x.bmp"]


@pytest.mark.parametrize("name", [*NAMES, "sub/q.TIF", "sub/deep/q.tif"])
def test_a_glob_set_selects_what_fnmatch_matches_in_any_case(watch: Path, image: ImageFile, name: str) -> None:
    path = image(name)
    sel = Selection(watch, include=GLOBS, recursive=True)
    expected = any(fnmatch.fnmatchcase(text.lower(), glob.lower()) for glob in GLOBS for text in (path.name, name))
    assert (sel.relpath(path) == name) is expected
    assert (scanned(sel) == [name]) is expected
    ignoring = Selection(watch, include=("*",), ignore=GLOBS, recursive=True)
    assert (ignoring.relpath(path) is None) is expected


def test_user_ignore_globs_apply_to_names_folders_and_paths(watch: Path, image: ImageFile) -> None:
    for rel in ["keep.png", "draft_1.png", "raw/a.png", "sub/ok.png", "sub/skip/x.png", "Sub2/DRAFT_2.png"]:
        image(rel)
    sel = selection(watch, recursive=True, ignore=("draft_*", "raw", "sub/skip/*"))
    assert scanned(sel) == ["keep.png", "sub/ok.png"]
    assert sel.relpath(watch / "raw" / "a.png") is None
    assert sel.relpath(watch / "sub" / "skip" / "x.png") is None
    assert sel.relpath(watch / "Sub2" / "DRAFT_2.png") is None


def test_subfolders_only_when_recursive(watch: Path, image: ImageFile) -> None:
    top, deep = image("top.png"), image("a/b/deep.png")
    flat = selection(watch)
    assert flat.relpath(top) == "top.png"
    assert flat.relpath(deep) is None
    assert scanned(flat) == ["top.png"]
    rec = selection(watch, recursive=True)
    assert rec.relpath(deep) == "a/b/deep.png"
    assert scanned(rec) == ["a/b/deep.png", "top.png"]


@pytest.mark.parametrize(
    "folder", [".cache", "@eaDir", "@EADIR", ".sinkwatch", "#recycle", "#snapshot", "@Recycle", "$RECYCLE.BIN"]
)
def test_hidden_and_thumbnail_folders_are_never_entered(watch: Path, image: ImageFile, folder: str) -> None:
    path = image(f"{folder}/a.png")
    image("ok/b.png")
    sel = selection(watch, recursive=True)
    assert sel.relpath(path) is None
    assert scanned(sel) == ["ok/b.png"]


@pytest.mark.parametrize("outside", ["../elsewhere.png", "/etc/hosts.png", ".."])
def test_paths_outside_the_root_are_not_selected(watch: Path, outside: str) -> None:
    assert selection(watch, recursive=True).relpath(watch / outside) is None
    assert selection(watch, recursive=True).relpath(watch) is None


def test_a_sibling_folder_with_the_same_prefix_is_outside(tmp_path: Path, watch: Path) -> None:
    sibling = tmp_path / "watch2"
    sibling.mkdir()
    (sibling / "a.png").write_bytes(b"x")
    assert selection(watch).relpath(sibling / "a.png") is None


def test_symlinks_leaving_the_root_are_not_followed(tmp_path: Path, watch: Path, image: ImageFile) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "private.png").write_bytes(b"private")
    (watch / "escape.png").symlink_to(secret / "private.png")
    (watch / "dangling.png").symlink_to(secret / "gone.png")
    (watch / "linked_dir").symlink_to(secret, target_is_directory=True)
    inside = image("real.png")
    (watch / "alias.png").symlink_to(inside)
    sel = selection(watch, recursive=True)
    assert sel.relpath(watch / "escape.png") is None
    assert sel.relpath(watch / "dangling.png") is None
    assert sel.relpath(watch / "linked_dir" / "private.png") is None
    assert sel.relpath(watch / "alias.png") == "alias.png", "a link that stays inside is a file like any other"
    assert scanned(sel) == ["alias.png", "real.png"]


def test_a_file_passed_over_for_what_it_is_is_said_once(tmp_path: Path, watch: Path) -> None:
    (tmp_path / "outside.png").write_bytes(b"png")
    (watch / "escape.png").symlink_to(tmp_path / "outside.png")
    os.mkfifo(watch / "pipe.png")
    messages: list[str] = []
    counted: list[None] = []
    sink = logger.add(lambda message: messages.append(message.record["message"]), level="INFO")
    try:
        sel = selection(watch, on_passed_over=lambda: counted.append(None))
        for _ in range(2):  # a scan, then events and the next scan: said once all the same
            assert scanned(sel) == [] and sel.relpath(watch / "escape.png") is None
    finally:
        logger.remove(sink)
    assert sorted(messages) == [
        f"{watch / 'escape.png'} is a link leading outside the watch folder (not followed): not taken",
        f"{watch / 'pipe.png'} is not a regular file: not taken",
    ]
    assert len(counted) == 2, "each counted once, as it is said once"


def test_symlinked_folders_inside_the_root_are_not_entered(watch: Path, image: ImageFile) -> None:
    image("real/a.png")
    (watch / "mirror").symlink_to(watch / "real", target_is_directory=True)
    sel = selection(watch, recursive=True)
    assert sel.relpath(watch / "mirror" / "a.png") is None, "the same file must not get a second key"
    assert scanned(sel) == ["real/a.png"]


def test_a_root_given_through_a_symlink_still_works(tmp_path: Path, watch: Path, image: ImageFile) -> None:
    image("a.png")
    link = tmp_path / "watch_link"
    link.symlink_to(watch, target_is_directory=True)
    sel = selection(link)
    assert sel.relpath(link / "a.png") == "a.png"
    assert sel.relpath(watch / "a.png") == "a.png", "events may carry the resolved path"
    assert scanned(sel) == ["a.png"]


def test_only_regular_files_are_selected(watch: Path, image: ImageFile) -> None:
    (watch / "folder.png").mkdir()
    os.mkfifo(watch / "pipe.png")  # opening it would block the decoder forever
    image("real.png")
    sel = selection(watch)
    assert sel.relpath(watch / "folder.png") is None
    assert sel.relpath(watch / "pipe.png") is None
    assert scanned(sel) == ["real.png"]


def test_a_path_that_no_longer_exists_keeps_its_key(watch: Path) -> None:
    assert selection(watch).relpath(watch / "deleted.png") == "deleted.png"


def test_relative_paths_are_resolved_against_the_working_directory(
    watch: Path, image: ImageFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    image("a.png")
    monkeypatch.chdir(watch.parent)
    assert Selection(Path("watch"), include=("*.png",)).relpath(Path("watch/a.png")) == "a.png"


def test_scan_order_is_sorted_and_deterministic(watch: Path, image: ImageFile) -> None:
    names = ["b.png", "a/z.png", "a/b/c.png", "C.png", "a.png", "ä.png", "0.png"]
    for name in reversed(names):
        image(name)
    sel = selection(watch, recursive=True)
    first = scanned(sel)
    assert first == ["0.png", "C.png", "a/b/c.png", "a/z.png", "a.png", "b.png", "ä.png"]
    assert scanned(sel) == first


def test_scan_is_lazy_and_survives_files_and_folders_vanishing(watch: Path, image: ImageFile) -> None:
    for rel in ["a/1.png", "a/2.png", "b/1.png", "b/2.png", "c/1.png"]:
        image(rel)
    scan = selection(watch, recursive=True).scan()
    first = next(scan)
    assert first == watch / "a" / "1.png"
    shutil.rmtree(watch / "b")
    (watch / "c" / "1.png").unlink()
    image("c/new.png")
    rest = [path.relative_to(watch).as_posix() for path in scan]
    assert "b/1.png" not in rest and "b/2.png" not in rest
    assert "c/new.png" in rest, "folders are listed when reached, not up front"


def test_scan_of_a_missing_root_yields_nothing(tmp_path: Path) -> None:
    assert list(selection(tmp_path / "absent", recursive=True).scan()) == []


def test_scan_skips_a_folder_it_cannot_read_injected_eacces(
    watch: Path, image: ImageFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Injected at os.scandir: tests may run as root, where chmod 000 does not stop reading a folder."""
    for rel in ["locked/a.png", "open/b.png", "top.png"]:
        image(rel)
    real_scandir = os.scandir

    def scandir(path: os.PathLike[str]) -> Iterator[os.DirEntry[str]]:
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert scanned(selection(watch, recursive=True)) == ["open/b.png", "top.png"]


def test_scan_and_relpath_agree_on_a_mixed_tree(tmp_path: Path, watch: Path, image: ImageFile) -> None:
    rels = ["a.png", "b.txt", ".c.png", "d/e.png", "d/.f/g.png", "@eaDir/h.png", "i.part", "j/k/l.JPG"]
    for rel in rels:
        image(rel)
    (watch / "out.png").symlink_to(tmp_path)
    sel = selection(watch, recursive=True)
    by_event = sorted(key for rel in rels if (key := sel.relpath(watch / rel)) is not None)
    assert scanned(sel) == by_event == ["a.png", "d/e.png", "j/k/l.JPG"]


def test_a_folder_a_scan_cannot_read_is_said_once_and_again_when_it_can_be(open_tmp: Path) -> None:
    # A subfolder made private: its images are not seen, and a scan a minute must neither hide why nor repeat it.
    watch = open_tmp / "watch"
    watch.mkdir()
    (watch / "b.png").write_bytes(b"png")
    watch.chmod(0o777)
    private = watch / "private"

    def scans() -> tuple[list[list[str]], list[str]]:
        # As the user whose permissions bind (made here, so that it may change the folder's mode).
        private.mkdir()
        (private / "a.png").write_bytes(b"png")
        messages: list[str] = []
        sink = logger.add(lambda message: messages.append(message.record["message"]), level="INFO")
        selection = Selection(watch, include=("*.png",), recursive=True)
        found = []
        for mode in (0o000, 0o000, 0o755):
            private.chmod(mode)
            found.append([key for key, _path in selection.scan_keys()])
        logger.remove(sink)
        return found, messages

    found, messages = where_permissions_bind(open_tmp, scans)
    assert found == [["b.png"], ["b.png"], ["b.png", "private/a.png"]]
    assert messages == [
        f"cannot read the folder {private} (Permission denied): its images wait until it can be read",
        f"the folder {private} can be read again",
    ]
