"""`sinkwatch run`: the daemon loop (initialize / loop / shutdown, like huey's consumer).

Everything happens on the main thread except the observer (which only
enqueues events) and the HTTP listener (which only reads state). Time is
injectable so the loop can be driven in tests without sleeping.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Literal

from loguru import logger
from prometheus_client import CollectorRegistry, disable_created_metrics

from service import __version__, notify
from service.comfyui_uploads import owed, settled, uploads_for
from service.discovery import Discovery
from service.engine import Engine, Limits
from service.errors import ConfigError, PublishError, SinkwatchError
from service.folders import Folders, folder_problem, prepare_folders
from service.http import serve
from service.ledger import Ledger
from service.ledger_runs import current_boot, kill_may_count
from service.lock import InstanceLock, QueueLock
from service.metrics import Metrics
from service.pool import WorkerPool
from service.reload import RuleReloader, record_rules
from service.rules import RuleSet
from service.selection import Selection
from service.settings import Settings, add_flags, logged_settings, warn_unknown_environment
from service.stability import StabilityTracker
from service.upgrade import CodeWatch
from service.watch_limit import WatchLimit
from service.watcher import EventQueue, FolderWatcher

LOOP_TICK = 0.05
# A watcher that cannot be restarted (inotify limits) is tried again this often, not on every turn.
WATCHER_RETRY = 5.0
# sqlite's primary result codes for a disk that is full, read-only or failing: conditions that may pass.
LEDGER_DISK_ERRORS = frozenset({sqlite3.SQLITE_FULL, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--once",
        action="store_true",
        help=(
            "process the backlog, then exit: 0 when all of it is done; 1 when something was rejected "
            "(an image, or a frame or workflow by ComfyUI) or left unfinished (retries, uploads owed to ComfyUI); "
            "128+N when signal N (SIGTERM, SIGINT) stopped it first"
        ),
    )
    add_flags(parser)


def main(args: argparse.Namespace) -> int:
    settings = logged_settings(args)
    warn_unknown_environment()
    # The *_created series double the exposition and no dashboard or alert uses them.
    disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated
    return Daemon(settings).run(once=args.once)


class Daemon:
    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.registry = CollectorRegistry()
        self.stopping = False
        # Here, not in initialize: SIGHUP may arrive while the daemon starts.
        self.reloader = RuleReloader(settings.rules)
        self.ready = False
        self.watch_missing = False
        self.watcher_started = False
        self.watcher_error: str | None = None
        self.next_watcher_restart = -math.inf
        self.next_state_check = -math.inf
        self.next_retry_check = -math.inf
        self.ledger_paused = False
        self.stop_signal: int | None = None
        self.resources = contextlib.ExitStack()
        self.code = CodeWatch()
        self.upgraded = False

    # -- initialize -----------------------------------------------------------

    def initialize(self, *, once: bool = False) -> None:
        s = self.settings
        # Broken rules are the settings' fault (exit 2): said before anything is made or locked, even when another
        # sinkwatch holds the queue (which would make it exit 75, "try again later").
        self.rules: RuleSet = self.reloader.load()
        # A named watch folder that is missing may be a mount not up yet at boot, or a typo: the daemon
        # waits for it (logged, and /healthz says so), while a `--once` run has nothing to wait for.
        missing: Literal["create", "wait", "refuse"] = "create" if not s.watch_given else "refuse" if once else "wait"
        self.folders: Folders = prepare_folders(s.watch, s.queue_folder, s.state_dir, if_watch_missing=missing)
        problem = folder_problem(self.folders.watch)
        if problem:
            logger.warning("the watch folder {} {}; waiting for it (check --watch)", self.folders.watch, problem)
            self.watch_missing = True
        self.lock = InstanceLock(self.folders.state)
        self.lock.acquire()
        self.resources.callback(self.lock.release)
        # A sinkwatch with its state elsewhere may publish into this queue: refuse before cleaning its temp files.
        self.queue_lock = QueueLock(self.folders.queue)
        self.queue_lock.acquire()
        self.resources.callback(self.queue_lock.release)
        self.metrics = Metrics(self.registry, rules=self.rules.names)
        record_rules(self.metrics, self.rules)
        self.metrics.workers.set(s.workers)
        self.ledger = _open_ledger(self.folders.state / "ledger.sqlite3")
        self.resources.callback(self.ledger.close)
        self.metrics.ledger_writable.set(1)
        # `sinkwatch process` keys a file outside its own --watch folder by absolute path: those in ours become ours.
        adopted = self.ledger.adopt(self.folders.watch)
        if adopted:
            logger.info("took over {} ledger entries `sinkwatch process` made in {}", adopted, self.folders.watch)
        self.selection = Selection(
            self.folders.watch,
            include=s.include,
            ignore=s.ignore,
            recursive=s.recursive,
            on_passed_over=self.metrics.passed_over.inc,
        )
        self.pool = WorkerPool(s.workers)
        self.resources.callback(self.pool.close)
        self.events = EventQueue(maxsize=max(1024, 4 * s.queue_size))
        self.engine = Engine(
            queue=self.folders.queue,
            rules=self.rules,
            ledger=self.ledger,
            pool=self.pool,
            metrics=self.metrics,
            limits=Limits(s.max_bytes, s.max_pixels, s.max_attempts, s.retry_base, s.queue_size),
            resolve=lambda key: self.folders.watch / key,
            wakeup=self.events.arrived,
            events_tell_departures=not s.polling,
            frame_refs=s.frame_refs,
        )
        self.uploads = uploads_for(s, ledger=self.ledger, engine=self.engine, metrics=self.metrics, watch_jobs=not once)
        if self.uploads is not None:
            self.resources.callback(self.uploads.close)
        removed = self.engine.publisher.clean_temp()
        if removed:
            logger.warning("removed {} temp files left by an interrupted run", removed)
        try:
            # So that `sinkwatch process`, given our files without our --watch, keys them as we do.
            self.engine.publisher.record_watch_folder(self.folders.watch)
        except PublishError as exc:  # a full queue, say: publications wait for room, this for the next start
            logger.warning("{}", exc)
        self.discovery = Discovery(
            selection=self.selection,
            events=self.events,
            tracker=StabilityTracker(settle=s.settle_seconds, clock=self.clock),
            engine=self.engine,
            clock=self.clock,
            forget_after=s.forget_after_days * 86400.0,
        )
        self.watcher = FolderWatcher(
            self.folders.watch, self.events, recursive=s.recursive, polling=s.polling, poll_interval=s.poll_interval
        )
        self.watch_limit = WatchLimit(self.watcher, rescan_interval=s.rescan_interval)
        self.scan_checked = self.discovery.last_scan_done
        self.server = None
        if not once:
            if s.metrics_port:
                self.server = serve(
                    s.metrics_host, s.metrics_port, registry=self.registry, health=self.health, ready=self.serving
                )
                self.resources.callback(self.server.close)
            self.resources.callback(self.watcher.stop)
            if not self.watch_missing:
                self.watcher.start()
                self.watcher_started = True
                self.metrics.watcher_up.set(1)
        boot = current_boot()
        recovered = self.engine.recover(kills_count=kill_may_count(self.ledger.begin_run(boot), boot))
        if recovered:
            logger.info("recovered {} images published just before an interrupted run ended", recovered)
        self.discovery.start_scan("startup")
        self.discovery.feed_scan()
        self.ready = True
        self._announce(once)

    def _announce(self, once: bool) -> None:
        f = self.folders
        logger.info(
            "sinkwatch {} watching {} -> queue {} ({} workers, rules: {})",
            __version__,
            f.watch,
            f.queue,
            self.settings.workers,
            ", ".join(self.rules.names),
        )
        if self.server is not None:
            logger.info("metrics at {}/metrics, health at {}/healthz", self.server.url, self.server.url)
        if not once:
            notify.notify("READY=1")
            notify.notify(f"STATUS=watching {f.watch}")

    # -- loop -----------------------------------------------------------------

    def loop(self, *, once: bool = False) -> None:
        self.next_ping = self.clock()
        self.ping_every = notify.watchdog_interval()
        while not self.stopping:
            # The loop turning is what the watchdog asks about; /healthz reports what is degraded.
            self._ping_watchdog()
            try:
                if self.tick(once=once):
                    return
            except SinkwatchError as exc:
                if not exc.transient:
                    raise
                # The ledger's disk is full or read-only: the sources are untouched, so wait and carry on.
                if not self.ledger_paused:
                    logger.bind(reason=exc.reason, stage=exc.stage).error(
                        "cannot record progress, pausing until it can: {}", exc
                    )
                    self.ledger_paused = True
                    self.metrics.ledger_writable.set(0)
                time.sleep(1.0)
                continue
            if self.ledger_paused:
                logger.info("the ledger records progress again")
                self.ledger_paused = False
                self.metrics.ledger_writable.set(1)

    def tick(self, *, once: bool = False) -> bool:
        """One turn of the loop; True when a `--once` run has nothing left to do."""
        now = self.clock()
        if self.code.changed(now):
            logger.warning(
                "sinkwatch was changed on disk (an upgrade?): stopping, so that it starts again on the new code "
                "(exit 75); a worker started now would run the new code beside this old process"
            )
            self.upgraded = self.stopping = True
            return False
        if not once:
            self.discovery.take_events()
            self._check_watcher()
        self._check_state(now)
        if now >= self.next_retry_check:
            self.engine.requeue_due()
            self.metrics.retries_waiting.set(self.ledger.count("retry"))
            self.next_retry_check = now + 0.5
        rules = self.reloader.poll(now, metrics=self.metrics)
        if rules is not None:
            self.rules = self.engine.rules = rules
        self.discovery.feed_scan()
        if not once and self.discovery.last_scan_done != self.scan_checked:
            self.scan_checked = self.discovery.last_scan_done
            if self.watch_limit.check():
                self.discovery.start_scan("scan")  # events in the unwatched subfolders were never seen
        # Not while a scan runs: its end moves last_scan_done, and asking again would queue a second scan.
        since = now - self.discovery.last_scan_done
        rescan_due = not self.discovery.scanning and since >= self.settings.rescan_interval
        if not once and (rescan_due or self.events.take_overflow()):
            self.discovery.start_scan("scan")
        # A scan the engine has room for goes on at once: waiting a tick per chunk of mostly unchanged files
        # stretched a scan of 20,000 over 4 s and kept new files at the end of the listing waiting.
        hurry = self.discovery.scanning and self.engine.has_room()
        self.engine.pump(timeout=0.0 if hurry else LOOP_TICK)
        if self.uploads is not None:
            self.uploads.pump()
        if once:
            engine = self.engine
            done = not self.discovery.scanning and engine.idle() and not engine.retrying(self.settings.max_attempts)
            return done and settled(self.uploads)
        return False

    def _ping_watchdog(self) -> None:
        now = self.clock()
        if self.ping_every and now >= self.next_ping:
            notify.notify("WATCHDOG=1")
            self.next_ping = now + self.ping_every / 2

    def _check_state(self, now: float) -> None:
        """The state folder (by default inside the queue) deleted under a running daemon: put lock and ledger back."""
        if now < self.next_state_check:
            return
        self.next_state_check = now + 1.0
        if self.queue_lock.lost():
            logger.error("the queue's lock file {} was deleted; taking it again", self.queue_lock.path)
            self.queue_lock.reacquire()  # FolderBusy if another sinkwatch took the queue meanwhile: stop
        if not (self.lock.lost() or self.ledger.moved()):
            return
        logger.error("the state folder {} was deleted; writing the lock and the ledger back", self.folders.state)
        self.lock.reacquire()  # FolderBusy if another sinkwatch took the folder meanwhile: stop
        if self.ledger.moved():
            self.ledger.rewrite()

    def _check_watcher(self) -> None:
        if self.watcher.alive():
            if self.watch_missing:  # renamed away and back: the same folder, watched all along
                self._watch_folder_back()
                self.metrics.watcher_up.set(1)
            return
        self.metrics.watcher_up.set(0)
        problem = folder_problem(self.folders.watch)
        if problem:
            if not self.watch_missing:
                logger.error(
                    "the watch folder {} disappeared from view: it {}; waiting for it to come back",
                    self.folders.watch,
                    problem,
                )
                self.watch_missing = True
            return
        if self.watch_missing:
            # Said here, not once the watcher runs: /healthz must not blame a folder that is there.
            self._watch_folder_back()
        now = self.clock()
        if now < self.next_watcher_restart:
            return
        try:
            self.watcher.restart()
        except ConfigError as exc:
            self.next_watcher_restart = now + WATCHER_RETRY
            if str(exc) != self.watcher_error:
                self.watcher_error = str(exc)
                logger.error("cannot restart the watcher (trying again every {:.0f}s): {}", WATCHER_RETRY, exc)
            return
        self.watcher_error = None
        self.metrics.watcher_up.set(1)
        if self.watcher_started:
            self.metrics.watcher_restarts.inc()
            logger.warning("the folder watcher had stopped; restarted it and rescanning")
        self.watcher_started = True  # a watch folder missing at start: its first watch is no restart
        self.discovery.start_scan("scan", mark=True)  # files may have left while nothing watched

    def _watch_folder_back(self) -> None:
        logger.info("the watch folder {} is back; watching again", self.folders.watch)
        self.watch_missing = False

    # -- health ---------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, object]]:
        """The checks (True: fine) and what explains them; the reason names only checks that failed."""
        scan_age = self.clock() - self.discovery.last_scan_done
        checks = {
            "watcher": self.watcher.alive(),
            "workers": self.pool.alive(),
            "scan_recent": self.discovery.scanning or scan_age < 3 * self.settings.rescan_interval,
            "ledger": not self.ledger_paused,
        }
        failed = [name for name, ok in checks.items() if not ok]
        if self.watch_missing:
            failed.insert(0, "watch_folder_missing")  # why the watcher is down, so it comes first
        details: dict[str, object] = {
            **checks,
            "watch_folder_missing": self.watch_missing,
            "last_scan_age_seconds": round(scan_age, 1),
            "watch_limit_reached": self.watch_limit.reached,
        }
        if failed:
            details["reason"] = "failed: " + ", ".join(failed)
        return not failed, details

    def serving(self) -> bool:
        """/readyz: taking new images (the startup scan is queued, no stop has begun)."""
        return self.ready and not self.stopping

    # -- shutdown -------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop finding work, finish what is in flight, then release everything in reverse order."""
        notify.notify("STOPPING=1")
        self.watcher.stop()
        logger.info("stopping: finishing {} images in flight", len(self.engine.in_flight))
        # A kill while the images in flight finish is the stop's timeout, not theirs (see service.ledger_runs);
        # a ledger that cannot record it (its disk full) leaves such a kill counted, as before.
        with contextlib.suppress(SinkwatchError):
            self.ledger.run_stopping()
        self.engine.drain()
        self.resources.close()
        logger.info("stopped")

    def stop(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        self.stopping = True
        self.stop_signal = signum

    def run(self, *, once: bool = False) -> int:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        signal.signal(signal.SIGHUP, lambda *_: self.reloader.request())
        try:
            self.initialize(once=once)
        except BaseException:
            self.resources.close()
            raise
        try:
            self.loop(once=once)
            interrupted = once and self.stopping
            unfinished = once and (bool(self.ledger.entries("retry")) or bool(self.uploads and owed(self.uploads)))
        finally:
            self.shutdown()
        if self.upgraded:
            return os.EX_TEMPFAIL  # as FolderBusy: a supervisor starts it again
        if interrupted:  # the backlog is not done: say so, as a shell does for a signal
            return 128 + (self.stop_signal or signal.SIGTERM)
        refused = self.uploads is not None and self.uploads.refused
        if once and (self.engine.counts["rejected"] or refused or unfinished):
            return 1
        return 0


def _open_ledger(path: Path) -> Ledger:
    """The ledger, or a transient error when its disk is full or read-only (exit 75, not 2).

    The ledger calls any failure to open it a configuration error, but once running it waits out a
    disk that is full or read-only: at start that is just as passing. A damaged or too new ledger,
    or a path that cannot be a database, stays a configuration error.
    """
    try:
        return Ledger(path)
    except ConfigError as exc:
        cause = exc.__cause__
        if isinstance(cause, PublishError):  # the ledger's own wrapping of an sqlite error
            cause = cause.__cause__
        if isinstance(cause, sqlite3.Error) and cause.sqlite_errorcode & 0xFF in LEDGER_DISK_ERRORS:
            raise PublishError(exc.message, path=path, stage="ledger") from exc
        raise
