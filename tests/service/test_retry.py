"""service.retry: capped exponential backoff, and keep_trying with a stop event (waits recorded, never slept)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import pytest

from service.errors import ComfyRejected, ComfyUnavailable
from service.retry import backoff, keep_trying
from tests.conftest import wait_for

# --- backoff ------------------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff(n, base=0.5, cap=4.0) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_backoff_of_an_endless_outage_stays_at_the_cap() -> None:
    # 2.0 ** 9999 would overflow a float: the exponent is bounded long before that.
    assert backoff(10_000, base=1.0, cap=300.0) == 300.0


def test_a_base_above_the_cap_is_cut_from_the_first_failure() -> None:
    assert backoff(1, base=10.0, cap=3.0) == 3.0


# --- keep_trying --------------------------------------------------------------------------------


def _flaky(failures: Sequence[BaseException]) -> Callable[[], str]:
    """A call that raises each of `failures` in turn, then answers."""
    pending = list(failures)

    def call() -> str:
        if pending:
            raise pending.pop(0)
        return "answer"

    return call


class NeverStopped(threading.Event):
    """A stop event that is never set and records the waits instead of sleeping them."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        return False


def test_keep_trying_reports_each_transient_failure_and_waits_its_backoff_until_the_call_answers() -> None:
    failures = [ComfyUnavailable(f"down {n}", url="http://x") for n in range(4)]
    reported: list[tuple[BaseException, float]] = []
    stop = NeverStopped()
    answer = keep_trying(
        _flaky(failures),
        transient=ComfyUnavailable,
        base=1.0,
        cap=3.0,
        stop=stop,
        failed=lambda error, delay: reported.append((error, delay)),
    )
    assert answer == "answer"
    assert reported == list(zip(failures, [1.0, 2.0, 3.0, 3.0], strict=True))
    assert stop.waits == [1.0, 2.0, 3.0, 3.0]


def test_keep_trying_raises_the_last_failure_once_stopped_and_passes_other_errors_through() -> None:
    stop = threading.Event()
    stop.set()
    down = ComfyUnavailable("down", url="http://x")
    reported: list[BaseException] = []
    with pytest.raises(ComfyUnavailable) as caught:
        keep_trying(
            _flaky([down]),
            transient=ComfyUnavailable,
            base=3600.0,
            cap=3600.0,
            stop=stop,
            failed=lambda error, _delay: reported.append(error),
        )
    assert caught.value is down and reported == [down]
    refused = ComfyRejected("refused", url="http://x", status=400)
    with pytest.raises(ComfyRejected):
        keep_trying(
            _flaky([refused]),
            transient=ComfyUnavailable,
            base=0.0,
            cap=0.0,
            stop=threading.Event(),
            failed=lambda error, _delay: reported.append(error),
        )
    assert reported == [down], "a failure that is not transient is not retried"


def test_an_answer_at_the_first_call_neither_reports_nor_waits() -> None:
    reported: list[BaseException] = []
    stop = NeverStopped()
    answer = keep_trying(
        _flaky([]), transient=ComfyUnavailable, base=1.0, cap=1.0, stop=stop, failed=lambda e, _d: reported.append(e)
    )
    assert (answer, reported, stop.waits) == ("answer", [], [])


def test_a_permanent_error_after_transient_ones_ends_the_retries_at_once() -> None:
    down = ComfyUnavailable("down", url="http://x")
    refused = ComfyRejected("refused", url="http://x", status=400)
    stop = NeverStopped()
    with pytest.raises(ComfyRejected) as caught:
        keep_trying(
            _flaky([down, down, refused]),
            transient=ComfyUnavailable,
            base=1.0,
            cap=8.0,
            stop=stop,
            failed=lambda *_: None,
        )
    assert caught.value is refused
    assert stop.waits == [1.0, 2.0], "no wait follows the permanent error"


def test_setting_stop_during_a_long_wait_ends_it_with_the_last_failure() -> None:
    stop = threading.Event()
    failures = [ComfyUnavailable(f"down {n}", url="http://x") for n in range(3)]
    reported: list[BaseException] = []
    raised: list[BaseException] = []

    def retry_for_an_hour() -> None:
        try:
            keep_trying(
                _flaky(failures),
                transient=ComfyUnavailable,
                base=3600.0,
                cap=3600.0,
                stop=stop,
                failed=lambda error, _delay: reported.append(error),
            )
        except ComfyUnavailable as error:
            raised.append(error)

    worker = threading.Thread(target=retry_for_an_hour, name="keep-trying")
    worker.start()
    wait_for(lambda: reported)
    stop.set()
    worker.join(timeout=30)
    assert not worker.is_alive(), "setting stop did not end the hour-long wait"
    assert raised == [failures[0]] and reported == [failures[0]], "one call, one wait, then the stop"
