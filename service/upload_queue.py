"""The uploader's line of frames to send: one task per output name, bounded, overflowing into the ledger.

A frame republished while its upload waits must be sent once, as it is now,
with the video size of its newest rule: so a task is keyed by output name and
a newer one *replaces* the task waiting under that name, in the same place.
Why the same place rather than the back of the line: a name republished
every few seconds (a fixed-name output such as ``latest.png``) would be pushed
back each time and, behind a backlog, never sent. The frame is read when it is
sent, so the place in line costs nothing in freshness. (The ledger keeps the
same order: a pending row keeps the time it was first owed.)

A task already taken by the sender can be superseded too: :meth:`superseded`
tells the sender, before each attempt, that a newer generation of its name is
known, and it drops the old one.

At most ``limit`` tasks wait in memory: while ComfyUI is down frames keep
coming, and every one is pending in the ledger anyway. An :meth:`put` past the
limit is left to the ledger (it returns False) and the owner tops the line up
from the ledger's pending rows with :meth:`offer` when it runs low.

A taken task stays *held* until its owner :meth:`release`\\ s it (after the
result has been written to the ledger), so a refill from the ledger, which
still shows it pending meanwhile, never sends it twice.

Thread-safe: the owner (the main thread) puts, offers and releases; the
sender thread takes. One condition guards it all.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

DEFAULT_LIMIT = 1000


@dataclass(frozen=True)
class Task:
    """One frame to send: its output name (stem), source key, video size and ledger generation."""

    name: str
    key: str
    width: int
    height: int
    generation: int
    # A try of this task's workflow failed without an answer in an earlier run (the ledger says so): ComfyUI may
    # have queued it, so the first try looks for its prompt_id before sending.
    look_first: bool = False


class TaskQueue:
    def __init__(self, *, limit: int = DEFAULT_LIMIT) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.limit = limit
        self._waiting: OrderedDict[str, Task] = OrderedDict()
        self._held: dict[str, int] = {}  # name -> generation taken and not yet released
        self._newest: dict[str, int] = {}  # name -> newest generation known, for names waiting or held
        self._closed = False
        self._changed = threading.Condition()

    def put(self, task: Task) -> bool:
        """Add or replace the task of ``task.name`` (a newer generation only); False: full, left to the ledger."""
        with self._changed:
            waiting = self._waiting.get(task.name)
            if waiting is None and len(self._waiting) >= self.limit:
                if task.name in self._held:
                    self._note_newest(task)  # the held, older one must still be dropped
                return False
            if waiting is None or waiting.generation <= task.generation:
                self._waiting[task.name] = task  # a replaced key keeps its place in an OrderedDict
                self._note_newest(task)
                self._changed.notify()
            return True

    def offer(self, tasks: Iterable[Task]) -> int:
        """Add the tasks (read from the ledger) that are new here while there is room; returns how many did not fit."""
        added = left = 0
        with self._changed:
            for task in tasks:
                if task.name in self._waiting or self._held.get(task.name, 0) >= task.generation:
                    continue  # already in line, or being sent / its result not yet recorded
                if len(self._waiting) >= self.limit:
                    left += 1
                    continue
                self._waiting[task.name] = task
                self._note_newest(task)
                added += 1
            if added:
                self._changed.notify()
        return left

    def take(self) -> Task | None:
        """The first task in line, held until released; waits for one. None once closed."""
        with self._changed:
            while not self._waiting and not self._closed:
                self._changed.wait()
            if self._closed:
                return None
            _name, task = self._waiting.popitem(last=False)
            self._held[task.name] = task.generation
            return task

    def superseded(self, task: Task) -> bool:
        """A newer generation of the task's name is known: sending this one would send a stale frame or size."""
        with self._changed:
            return self._newest.get(task.name, task.generation) > task.generation

    def release(self, task: Task) -> None:
        """The task is finished and its result recorded; forget it (a newer one of its name stays)."""
        with self._changed:
            if self._held.get(task.name) == task.generation:
                del self._held[task.name]
            if task.name not in self._waiting and task.name not in self._held:
                self._newest.pop(task.name, None)

    def close(self) -> None:
        """Wake the sender; every take from now on returns None."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def qsize(self) -> int:
        """Tasks waiting in line (not counting held ones)."""
        with self._changed:
            return len(self._waiting)

    def known(self) -> int:
        """Tasks waiting or held: how many of the ledger's pending rows may already be here."""
        with self._changed:
            return len(self._waiting) + len(self._held)

    def empty(self) -> bool:
        """Nothing waiting and nothing held."""
        with self._changed:
            return not self._waiting and not self._held

    def _note_newest(self, task: Task) -> None:
        self._newest[task.name] = max(task.generation, self._newest.get(task.name, 0))
