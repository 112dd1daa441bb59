"""Which files in the watch folder are work, for events and scans alike.

One rule set serves both the watcher's events (`Selection.relpath`) and the
reconciliation scan (`Selection.scan`), so a file is never found by one and
ignored by the other. Keys are POSIX paths relative to the watch folder.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

# Always ignored: partial downloads, editor and OS litter, Synology thumbnails, and the recycle bins and
# snapshots of NAS shares and Windows (an image deleted over SMB lands there: it is no new image).
BUILTIN_IGNORE = (
    "*.tmp", "*.part", ".ds_store", "thumbs.db", "@eadir",
    "#recycle", "#snapshot", "@recycle", "@recently-snapshot", "$recycle.bin", "system volume information",
)  # fmt: skip


@dataclass(frozen=True)
class Selection:
    root: Path
    include: tuple[str, ...]
    ignore: tuple[str, ...] = ()
    recursive: bool = False
    # Folders a scan could not read (not vanished): each is said once, and again once it can be read.
    unreadable: set[str] = field(default_factory=set, compare=False, repr=False)
    # Those the latest scan could not read (or tell a file from a folder), as keys ("" the watch folder): it
    # cannot tell what left them.
    unlisted: list[str] = field(default_factory=list, compare=False, repr=False)
    # Files passed over for what they are (a link leading out, a FIFO): each is said once, and counted once
    # through `on_passed_over` (the daemon's metric).
    passed_over: set[str] = field(default_factory=set, compare=False, repr=False)
    on_passed_over: Callable[[], object] | None = field(default=None, compare=False, repr=False)

    def relpath(self, path: Path) -> str | None:
        """The source key of `path` if it is selected, else None.

        A path that does not exist (any more) is judged by its name alone, so
        that events for files that vanished still map to their key.
        """
        root = os.path.abspath(self.root)
        absolute = os.path.abspath(path)
        parts = _parts_under(absolute, root)
        if parts is None:
            # Events may carry resolved paths when the root was given through a symlink.
            root = os.path.realpath(root)
            parts = _parts_under(absolute, root)
        if not parts or (len(parts) > 1 and not self.recursive):
            return None
        if any(self._folder_excluded(parts[: i + 1]) for i in range(len(parts) - 1)):
            return None
        if not self._file_selected(parts) or _through_linked_folder(root, parts):
            return None
        return "/".join(parts) if self._acceptable(os.path.join(root, *parts), root) else None

    def scan(self) -> Iterator[Path]:
        """Every selected regular file present now, in sorted order.

        Lazy (the daemon feeds it to a bounded queue), never follows symlinked
        folders, and skips folders that vanish or cannot be read.
        """
        return (Path(path) for _key, path in self.scan_keys())

    def scan_keys(self) -> Iterator[tuple[str, str]]:
        """`scan` as (key, path) pairs of strings: the key without a `relpath` per file, no Path objects."""
        root = os.path.abspath(self.root)
        self.unlisted.clear()
        yield from self._scan_folder(root, (), root)

    def _scan_folder(self, folder: str, prefix: tuple[str, ...], root: str) -> Iterator[tuple[str, str]]:
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except (FileNotFoundError, NotADirectoryError):
            return  # vanished: gone with its images
        except OSError as exc:
            # Closed to this user, or a mount not answering: its images wait, and the user must hear why.
            self._unreadable(folder, prefix, f"cannot read the folder {folder} ({exc.strerror})")
            return
        if self.unreadable and folder in self.unreadable:
            self.unreadable.discard(folder)
            logger.bind(folder=folder).info("the folder {} can be read again", folder)
        for entry in entries:
            parts = (*prefix, entry.name)
            try:
                is_folder = entry.is_dir(follow_symlinks=False)
                is_file = entry.is_file(follow_symlinks=False)
            except OSError as exc:
                # A mount point not answering, say: nothing is known of what is there.
                self._unreadable(entry.path, parts, f"cannot tell what {entry.path} is ({exc.strerror})")
                continue
            if self.unreadable and entry.path in self.unreadable and not is_folder:
                self.unreadable.discard(entry.path)  # a folder says so when it is listed
                logger.bind(folder=entry.path).info("{} can be read again", entry.path)
            if is_folder:
                if self.recursive and not self._folder_excluded(parts):
                    yield from self._scan_folder(entry.path, parts, root)
            elif self._file_selected(parts):
                path = entry.path
                if is_file or self._acceptable(path, root):
                    yield "/".join(parts), path

    def _unreadable(self, path: str, parts: tuple[str, ...], why: str) -> None:
        """What the scan could not read: it tells nothing of the images there, and it is said once."""
        self.unlisted.append("/".join(parts))
        if path not in self.unreadable:
            self.unreadable.add(path)
            logger.bind(folder=path).warning("{}: its images wait until it can be read", why)

    def _acceptable(self, path: str, root: str) -> bool:
        reason = _passed_over(path, root)
        if reason is not None and path not in self.passed_over:
            self.passed_over.add(path)
            logger.bind(source=path).info("{} is {}: not taken", path, reason)
            if self.on_passed_over is not None:
                self.on_passed_over()
        return reason is None

    def _folder_excluded(self, parts: tuple[str, ...]) -> bool:
        name = parts[-1]
        return name.startswith(".") or _matches(name, BUILTIN_IGNORE) or self._ignored(parts)

    def _file_selected(self, parts: tuple[str, ...]) -> bool:
        name = parts[-1]
        if name.startswith(".") or _matches(name, BUILTIN_IGNORE) or self._ignored(parts):
            return False
        return _matches(name, self.include) or _matches("/".join(parts), self.include)

    def _ignored(self, parts: tuple[str, ...]) -> bool:
        return bool(self.ignore) and (_matches(parts[-1], self.ignore) or _matches("/".join(parts), self.ignore))


def linked_path(path: Path) -> Path:
    """`path` absolute, with its folder's links resolved and its own name kept: a source reached through a
    link is that link, as the daemon keys it."""
    return path.absolute().parent.resolve() / path.name


def _through_linked_folder(root: str, parts: tuple[str, ...]) -> bool:
    """Whether a folder on the way is a symlink: it would give the same file a second key."""
    folder = root
    for name in parts[:-1]:
        folder = os.path.join(folder, name)
        try:
            if stat.S_ISLNK(os.lstat(folder).st_mode):
                return True
        except OSError:
            return False  # gone: judged by its name alone
    return False


def _passed_over(path: str, root: str) -> str | None:
    """Why `path` is no source, or None: a regular file, or nothing (any more); a symlink only if its target is
    a file inside the root."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    if stat.S_ISLNK(mode):
        if _parts_under(os.path.realpath(path), os.path.realpath(root)) is None:
            return "a link leading outside the watch folder (not followed)"
        try:
            mode = os.stat(path).st_mode
        except OSError:
            return "a link leading nowhere"
    return None if stat.S_ISREG(mode) else "not a regular file"


def _parts_under(path: str, root: str) -> tuple[str, ...] | None:
    """The components of absolute `path` below absolute `root`, or None when it is not below."""
    if path == root:
        return ()
    prefix = root if root.endswith(os.sep) else root + os.sep
    return tuple(path[len(prefix) :].split(os.sep)) if path.startswith(prefix) else None


def _matches(text: str, globs: tuple[str, ...]) -> bool:
    return bool(globs) and _pattern(globs).match(text.lower()) is not None


@functools.lru_cache(maxsize=32)
def _pattern(globs: tuple[str, ...]) -> re.Pattern[str]:
    """One regex for any of `globs` (lower-cased): a scan tests every file name against each glob set."""
    return re.compile("|".join(f"(?:{fnmatch.translate(glob.lower())})" for glob in globs))
