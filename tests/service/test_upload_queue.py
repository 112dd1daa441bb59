"""The uploader's line of tasks (service/upload_queue.py): one per name, in place, bounded, refilled, superseded."""

from __future__ import annotations

import threading

import pytest

from service.upload_queue import Task, TaskQueue
from tests.conftest import wait_for


def task(name: str, generation: int = 1, width: int = 832, height: int = 480) -> Task:
    return Task(name, f"{name}.png", width, height, generation)


def drain(tasks: TaskQueue) -> list[Task]:
    taken = []
    while tasks.qsize():
        got = tasks.take()
        assert got is not None
        taken.append(got)
    return taken


def test_a_newer_task_replaces_the_waiting_one_in_its_place() -> None:
    tasks = TaskQueue()
    for item in (task("a"), task("b"), task("a", 2, 480, 832), task("c")):
        assert tasks.put(item)
    assert drain(tasks) == [task("a", 2, 480, 832), task("b"), task("c")]


def test_an_older_task_never_replaces_a_newer_one() -> None:
    tasks = TaskQueue()
    tasks.put(task("a", 3))
    tasks.put(task("a", 2))
    assert drain(tasks) == [task("a", 3)]


def test_a_taken_task_is_superseded_by_a_newer_generation_of_its_name() -> None:
    tasks = TaskQueue()
    tasks.put(task("a"))
    taken = tasks.take()
    assert taken is not None and not tasks.superseded(taken)
    tasks.put(task("b"))
    assert not tasks.superseded(taken), "another name says nothing about it"
    tasks.put(task("a", 2))
    assert tasks.superseded(taken)
    newer = drain(tasks)[1]
    assert newer == task("a", 2) and not tasks.superseded(newer)


def test_past_the_limit_a_task_is_left_to_the_ledger_but_still_supersedes_a_taken_one() -> None:
    tasks = TaskQueue(limit=2)
    assert tasks.put(task("a")) and tasks.put(task("b"))
    taken = tasks.take()
    assert taken == task("a")
    assert tasks.put(task("c"))
    assert not tasks.put(task("d")), "full"
    assert tasks.put(task("b", 2)), "a waiting name is replaced, full or not"
    assert not tasks.put(task("a", 2)), "full: the ledger keeps generation 2 of a"
    assert tasks.superseded(taken), "and the sender still learns that its a is stale"
    assert tasks.qsize() == 2 and tasks.known() == 3


def test_offer_adds_only_what_is_neither_waiting_nor_held_and_reports_what_did_not_fit() -> None:
    tasks = TaskQueue(limit=3)
    tasks.put(task("a"))
    held = tasks.take()
    tasks.put(task("b"))
    # A page of the ledger's pending rows: a is being sent, b waits already.
    left = tasks.offer([task("a"), task("b"), task("c"), task("d"), task("e")])
    assert left == 1
    assert [t.name for t in drain(tasks)] == ["b", "c", "d"]
    assert held is not None
    assert tasks.offer([task("a", 2)]) == 0 and tasks.qsize() == 1, "a newer generation of a held name is new"


def test_release_forgets_a_name_only_when_nothing_of_it_is_left() -> None:
    tasks = TaskQueue()
    tasks.put(task("a"))
    first = tasks.take()
    assert first is not None
    tasks.put(task("a", 2))
    tasks.release(first)
    assert tasks.offer([task("a", 2)]) == 0 and tasks.qsize() == 1, "generation 2 is still waiting"
    second = tasks.take()
    assert second == task("a", 2)
    assert tasks.offer([task("a", 2)]) == 0 and tasks.qsize() == 0, "held until released"
    tasks.release(second)
    assert tasks.empty()
    assert tasks.offer([task("a", 2)]) == 0 and tasks.qsize() == 1, "released: the ledger may line it up again"


def test_take_waits_for_a_task_and_close_wakes_it() -> None:
    tasks = TaskQueue()
    got: list[Task | None] = []

    def take_twice() -> None:
        got.append(tasks.take())
        got.append(tasks.take())

    taker = threading.Thread(target=take_twice)
    taker.start()
    tasks.put(task("a"))
    wait_for(lambda: len(got) == 1)
    tasks.close()
    taker.join(timeout=10)
    assert not taker.is_alive()
    assert got[0] == task("a") and got[1] is None


def test_the_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="limit"):
        TaskQueue(limit=0)
