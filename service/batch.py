"""`sinkwatch process PATH...`: the daemon's pipeline, once, over files and folders.

Same outputs, ledger and reject records as the daemon; a progress line on a
terminal; exit code 1 when anything of its own was rejected or left unfinished.
A file the daemon would pick up from its watch folder gets the daemon's own
ledger key (its path relative to that folder), so that `process` over the watch
folder followed by `run` on the same state never makes a frame twice. Only the
files it was given are retried, waited for and counted: other rows of a shared
ledger are the daemon's business.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

from loguru import logger
from prometheus_client import CollectorRegistry

from service.comfyui_uploads import finish, uploads_for
from service.engine import Candidate, Engine, Limits
from service.errors import ConfigError, RuleError, Stopped
from service.folders import check_layout, prepare_queue
from service.ledger import Entry, Ledger
from service.lock import InstanceLock, QueueLock
from service.logs import json_lines
from service.metrics import Metrics
from service.naming import disambiguated, safe_stem
from service.pool import STOP_SIGNALS, WorkerPool
from service.publish import Publisher
from service.rules import Rule, RuleSet, load_rule_file, load_rules
from service.selection import Selection, linked_path
from service.settings import Settings, add_flags, logged_settings, warn_unknown_environment


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files or folders of images")
    parser.add_argument("--rule", metavar="NAME|PATH", help="use this rule for every file instead of matching")
    parser.add_argument("--force", action="store_true", help="process again even what the ledger says is done")
    add_flags(parser)


def main(args: argparse.Namespace) -> int:
    # Stopped as by Ctrl-C (`timeout`, a closed terminal): the workers finish what they hold and go.
    for signum in STOP_SIGNALS:
        signal.signal(signum, _stop)
    settings = logged_settings(args)
    warn_unknown_environment()
    if settings.watch_given:  # the embedded default, a folder process never reads, is no layout of the user's
        check_layout(settings.watch, settings.queue_folder, settings.state_dir)
    queue_folder = settings.queue_folder.expanduser().resolve()
    found = list(expand(args.paths, settings, queue=queue_folder))
    if not found:
        raise ConfigError("no image files found in the given paths")
    rules = load_rules(settings.rules)
    forced = _choose_rule(args.rule, rules) if args.rule else None
    queue, state = prepare_queue(settings.queue_folder, settings.state_dir)
    with InstanceLock(state), QueueLock(queue), Ledger(state / "ledger.sqlite3") as ledger:
        keys = _Keys(settings, daemons_root=Publisher(queue).watch_folder(), recorded=ledger.get)
        # One candidate per key: a file named twice, or also inside a named folder, is one file, counted once.
        sources = list({c.key: c for c in (keys.candidate(path, label) for path, label in found)}.values())
        pool = WorkerPool(min(settings.workers, len(sources)))
        engine = Engine(
            queue=queue,
            rules=rules,
            ledger=ledger,
            pool=pool,
            metrics=Metrics(CollectorRegistry(), rules=rules.names),
            limits=Limits(
                settings.max_bytes, settings.max_pixels, settings.max_attempts, settings.retry_base, settings.queue_size
            ),
            resolve=keys.resolve,
            forced_rule=forced,
            force=args.force,
            frame_refs=settings.frame_refs,
        )
        uploads = uploads_for(settings, ledger=ledger, engine=engine, metrics=engine.metrics)
        owed = refused = 0
        already = _done_before(engine, sources)
        try:
            _run(engine, sources, already, settings.max_attempts)
            if uploads is not None:
                owed = finish(uploads)
                refused = uploads.refused
        except Stopped as stop:
            counts = engine.counts
            # Said before the workers are waited for: what they hold is in the count of what is left.
            done = counts["published"] + counts["skipped"] + counts["rejected"] + counts["ignored"]
            left = len(sources) - done - len(already)
            owing = f", {ledger.pending_upload_count()} uploads owed to ComfyUI" if uploads is not None else ""
            with contextlib.suppress(OSError):  # after a hangup the terminal is gone (EIO)
                print(
                    f"sinkwatch process: stopped by {signal.Signals(stop.signum).name}: {counts['published']} "
                    f"published, {counts['skipped'] + len(already)} unchanged, {counts['rejected']} rejected, "
                    f"{_ignored(counts)}{left} left for the next run{owing} -> {queue}",
                    file=sys.stderr,
                )
            raise
        finally:
            # A stop now (Ctrl-C twice, a hangup after a SIGTERM) cut the pool's shutdown short, and the exit then
            # waited for ever for a worker that was never told to go.
            _ignore_stops()
            if uploads is not None:
                uploads.close()
            pool.close()
        ours = {candidate.key for candidate in sources}
        unfinished = [entry.relpath for entry in ledger.entries("retry") if entry.relpath in ours]
    counts = engine.counts
    sent = f", {owed} uploads owed to ComfyUI, {refused} failed for good" if uploads is not None else ""
    print(
        f"sinkwatch process: {counts['published']} published, {counts['skipped'] + len(already)} unchanged, "
        f"{counts['rejected']} rejected, {_ignored(counts)}{len(unfinished)} unfinished{sent} -> {queue}",
        file=sys.stderr,
    )
    return 1 if counts["rejected"] or unfinished or owed or refused else 0


def _ignored(counts: dict[str, int]) -> str:
    """The summary's word on the images made from sinkwatch's own frames, when there were any."""
    return f"{counts['ignored']} ignored (made from sinkwatch's frames), " if counts["ignored"] else ""


def _stop(signum: int, _frame: object) -> None:
    # One stop is enough: another one pending now (systemd sends SIGHUP right after SIGTERM) would be raised
    # while this one unwinds, half-way through releasing a lock.
    _ignore_stops()
    raise Stopped(signum)


def _ignore_stops() -> None:
    """Stop signals change nothing from now on. Through a handler that does nothing, not SIG_IGN: a signal
    already pending when SIG_IGN comes raises OSError ("ignored due to race condition") wherever it lands."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _stopping_already)


def _stopping_already(_signum: int, _frame: object) -> None:
    """A stop signal once stopping, or while the pool closes after the work."""


def expand(paths: list[Path], settings: Settings, *, queue: Path) -> Iterator[tuple[Path, str]]:
    """(file, name label) for every image file named or inside a named folder; never one in the queue
    folder (a real path), whose frames are sinkwatch's own output."""
    for path in paths:
        try:
            mode = os.stat(path).st_mode
        except (FileNotFoundError, NotADirectoryError):
            raise ConfigError("no such file or folder", path=path) from None
        except OSError as exc:
            raise ConfigError(f"cannot reach it: {exc.strerror}", path=path) from exc
        real = path.resolve() if stat.S_ISDIR(mode) else linked_path(path)
        if real.is_relative_to(queue):
            raise ConfigError(f"it is in the queue folder {queue}: sinkwatch would process its own output", path=path)
        if stat.S_ISDIR(mode):
            selection = Selection(path, include=settings.include, ignore=settings.ignore, recursive=settings.recursive)
            # A scan never follows a linked folder: only a queue inside this folder can hold files it finds.
            queue_inside = queue.is_relative_to(real)
            passed_over = 0
            for label, found in selection.scan_keys():
                if queue_inside and linked_path(Path(found)).is_relative_to(queue):
                    passed_over += 1
                else:
                    yield Path(found), label
            if passed_over:
                logger.warning("{}: left out {} files in the queue folder {}: its own output", path, passed_over, queue)
        elif stat.S_ISREG(mode):
            yield path, path.name
        else:
            raise ConfigError("neither a file nor a folder", path=path)


def _choose_rule(choice: str, rules: RuleSet) -> Rule:
    path = Path(choice)
    if path.suffix == ".toml" or path.is_file():  # a folder of that name (a preset's subfolder) is no rule
        return load_rule_file(path)
    try:
        return rules.get(choice)
    except KeyError:
        raise RuleError(f"no rule named {choice!r}; known: {', '.join(rules.names)}", file=choice) from None


class _Keys:
    """Ledger keys as the daemon makes them for files in its watch folder, absolute paths otherwise.

    The daemon's watch folder is --watch, or else that of the daemon last started on the queue
    (`daemons_root`, a real path ending in a separator): there a file gets the key that daemon's start
    would give its absolute one (see `Ledger.adopt`), so that `process` run without the daemon's --watch
    does not take a file the daemon made for a new source.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        daemons_root: str | None,
        recorded: Callable[[str], Entry | None] = lambda _key: None,
    ) -> None:
        """`recorded(key)`: the ledger's row of that key, if any."""
        self.recorded = recorded
        self.watch = settings.watch
        self.daemon = Selection(
            settings.watch, include=settings.include, ignore=settings.ignore, recursive=settings.recursive
        )
        self.daemons_root = daemons_root
        self.other_than_the_daemons = _other_folder(settings.watch, daemons_root)
        self.paths: dict[str, Path] = {}

    def candidate(self, path: Path, label: str) -> Candidate:
        key = self.daemon.relpath(path)
        if key is not None and self.other_than_the_daemons:
            # Keys are paths in the daemon's folder: paths in another would take the names of its sources.
            raise ConfigError(
                f"{path} is in --watch {self.watch}, but the daemon on this queue watches {self.daemons_root}: "
                "give the daemon's --watch, or a --queue of its own"
            )
        absolute = False
        if key is None:
            # The folder's real path, not the file's: a link and its target are two sources, as in the daemon.
            key, absolute = self._outside(linked_path(path))
            before, absolute_before = self._outside(path.resolve())
            if before != key and self._made_for_link(before, label) and self.recorded(key) is None:
                key, absolute = before, absolute_before
        self.paths[key] = path
        if absolute:
            return Candidate(key, path, "batch", 0.0, label=label)
        return Candidate(key, path, "batch", 0.0)  # named and matched by its key, as the daemon does

    def _made_for_link(self, target: str, label: str) -> bool:
        """Whether the row of `target` was made for a link named `label`: earlier versions keyed a link by its
        target's path, and named the frame after the link. Keyed anew, the link's image would be made again."""
        entry = self.recorded(target)
        if entry is None or entry.output_name is None:
            return False
        stem, name = safe_stem(label), entry.output_name
        counter = name.rpartition("-")[2]
        made = {stem, disambiguated(stem, target)}
        if counter.isdigit():
            made.add(disambiguated(stem, target, counter=int(counter)))
        return name in made

    def _outside(self, real: Path) -> tuple[str, bool]:
        """The key of a file outside --watch, by its real path; and whether it is that absolute path (not one
        in the folder of the daemon last started on the queue)."""
        key = str(real)
        if self.daemons_root is None or not key.startswith(self.daemons_root):
            return key, True
        return Path(key).relative_to(self.daemons_root).as_posix(), False

    def resolve(self, key: str) -> Path:
        """The file of one of the candidates' keys (the engine resolves only those)."""
        return self.paths[key]


def _other_folder(watch: Path, daemons_root: str | None) -> bool:
    """Whether `watch` is another folder than the daemon's; not when the daemon's path is not one here
    (it runs in a container, where the folder is mounted elsewhere) or leads to the same folder."""
    try:
        return daemons_root is not None and not os.path.samefile(daemons_root, watch)
    except OSError:
        return False


def _done_before(engine: Engine, sources: list[Candidate]) -> set[str]:
    """The keys of `sources` the ledger has done already, unchanged since."""
    ours = {candidate.key for candidate in sources}
    # A source that waits for its retry is not done: it is offered, and its outcome counted, when the retry is due.
    waiting = {entry.relpath for entry in engine.ledger.entries("retry")} & ours
    return engine.settled([(c.key, str(c.path)) for c in sources], source="batch") - waiting


def _run(engine: Engine, sources: list[Candidate], done_before: set[str], max_attempts: int) -> None:
    """Process `sources` but those `done_before` until none is left to do or to retry."""
    ours = {candidate.key for candidate in sources}
    feed = (candidate for candidate in sources if candidate.key not in done_before)
    exhausted = False
    # On a terminal, among text lines: JSON lines for a log shipper (`docker run -t`) take no progress text.
    show = sys.stderr.isatty() and not json_lines()
    try:
        while True:
            while not exhausted and engine.has_room():
                item = next(feed, None)
                if item is None:
                    exhausted = True
                    break
                engine.offer(replace(item, seen_at=time.time()))
            engine.requeue_due(ours)
            engine.pump(timeout=0.1)
            if show:
                counts = {**engine.counts, "skipped": engine.counts["skipped"] + len(done_before)}
                done = sum(counts.values()) - counts["retried"]
                print(
                    f"\r[{done}/{len(sources)}] " + ", ".join(f"{k} {v}" for k, v in counts.items()),
                    end="",
                    file=sys.stderr,
                )
            if exhausted and engine.idle() and not engine.retrying(max_attempts, ours):
                break
    finally:
        # The progress line ends, stopped or not: what follows starts on a line of its own. After a hangup the
        # terminal is gone (EIO), and the stop goes on.
        with contextlib.suppress(OSError):
            if show:
                print(file=sys.stderr)
    logger.debug("batch finished: {} and {} done before", engine.counts, len(done_before))
