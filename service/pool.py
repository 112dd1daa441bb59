"""The worker pool: one process per worker, so decoding and the pipeline use every core.

Workers are spawned (never forked: the parent runs observer and HTTP threads),
ignore SIGINT/SIGTERM/SIGHUP from their first instant so that a stop (or a
Ctrl-C sent to the whole process group) drains them instead of killing them, and
die with the parent on Linux so that a killed daemon leaves no orphan
publishing behind its back. A worker that dies (OOM killer, segfault in a
codec) breaks the executor; the pool replaces it and the daemon retries the
jobs that were in flight.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import shutil
import signal
import tempfile
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import resource_tracker
from pathlib import Path

from service.codec_messages import CodecMessages, last_words
from service.runner import Job, Outcome, process_job

_PR_SET_PDEATHSIG = 1
# glibc mallopt parameters: keep frame-sized buffers on the heap between images instead of
# mmap/munmap-ing each one, which costs thousands of page faults (several ms) per image.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_HEAP_KEEP = 256 << 20
_MMAP_ABOVE = 64 << 20

# The OOM killer's preference for a worker (-1000..1000, added to its share of memory): a worker is the daemon's to
# replace and its image is tried again, where the daemon, or ComfyUI beside it with hours of work in memory, is not.
_OOM_SCORE_ADJ = 500

# This worker's stderr around each job (see service.codec_messages); None outside a worker.
_codec_messages: CodecMessages | None = None
# The pool's folder in the temp folder: this prefix, the daemon's pid, a dash, a random part.
_SPOOL = "sinkwatch-workers-"
# What a terminal sends the whole process group (Ctrl-C, a hangup) and a stop: for the daemon (or `process`),
# not its workers.
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


def init_worker(parent: int, spool: str | None = None) -> None:
    # `spool` may be missing: a daemon from before it (upgraded on disk under it) starting a new worker.
    # Not Linux/glibc: no prctl or mallopt; orphans then end when their pipe to the parent closes.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_ABOVE)
        libc.mallopt(_M_TRIM_THRESHOLD, _HEAP_KEEP)
    _offer_to_oom_killer()
    # The daemon died while this worker was starting, before the death signal was armed: leave now.
    if os.getppid() != parent:
        os._exit(1)
    import cv2
    from loguru import logger

    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    # Blocked since the spawn (see WorkerPool.submit); one that came meanwhile is dropped now, being ignored.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    # One image per process: OpenCV's own threads would only fight the other workers.
    cv2.setNumThreads(1)
    logger.remove()
    global _codec_messages
    if spool is not None:
        with contextlib.suppress(OSError):  # the pool's folder is gone (a temp cleaner): stderr as it is
            _codec_messages = CodecMessages(Path(spool))


def _offer_to_oom_killer() -> None:
    # Raising one's own score needs no privilege; one set higher already (by a container) is left alone.
    with contextlib.suppress(OSError, ValueError), open("/proc/self/oom_score_adj", "r+") as score:
        if int(score.read()) < _OOM_SCORE_ADJ:
            score.seek(0)
            score.write(str(_OOM_SCORE_ADJ))


def run_job(job: Job) -> Outcome:
    """`process_job` in a worker, with what the codecs printed to stderr meanwhile."""
    if _codec_messages is None:
        return process_job(job)
    outcome, said = _codec_messages.run(lambda: process_job(job))
    return replace(outcome, codec_messages=said) if said else outcome


class WorkerPool:
    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._context = multiprocessing.get_context("spawn")
        # The workers' stderr during their jobs (see service.codec_messages), in the temp folder: not the
        # user's folders (under the systemd unit, a private /tmp).
        _remove_stale_spools()
        self.spool = Path(tempfile.mkdtemp(prefix=f"{_SPOOL}{os.getpid()}-"))
        _start_resource_tracker()
        self._executor = self._new_executor()
        self.restarts = 0

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=self._context,
            initializer=init_worker,
            initargs=(os.getpid(), str(self.spool)),
        )

    def submit(self, job: Job) -> Future[Outcome]:
        # A submit may spawn a worker, which inherits the signal mask: blocked, a Ctrl-C in the terminal during
        # its second of imports no longer kills it before init_worker ignores it. The daemon gets it on return.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return self._executor.submit(run_job, job)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def replace(self) -> dict[int, tuple[str, ...]]:
        """Start a fresh executor after a worker died; the broken one is discarded. Returns what its workers
        printed in the jobs they did not finish, by pid (the dead one's last words among them)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        said = last_words(self.spool)
        self._executor = self._new_executor()
        self.restarts += 1
        return said

    def alive(self) -> bool:
        # The executor keeps its processes private; a broken pool is the signal we need.
        return not getattr(self._executor, "_broken", False)

    def close(self) -> None:
        """Let in-flight jobs finish, then stop the workers."""
        try:
            self._executor.shutdown(wait=True, cancel_futures=False)
        finally:  # also when the wait is cut short
            shutil.rmtree(self.spool, ignore_errors=True)


def _start_resource_tracker() -> None:
    """Start multiprocessing's bookkeeper of semaphores, which the first pool would start, with a hangup blocked.

    It ignores SIGINT and SIGTERM itself, not SIGHUP: the hangup a closed terminal sends the whole group killed
    it, and its successor printed tracebacks of semaphores it did not know. It keeps the blocked hangup.
    """
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        resource_tracker.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _remove_stale_spools() -> None:
    """The pool folders of daemons that are gone (killed with SIGKILL: a stopped one removes its own)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{_SPOOL}*-*"):
        pid = folder.name[len(_SPOOL) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
