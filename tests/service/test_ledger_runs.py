"""The ledger's record of the run that last started, and what it tells of a kill (service.ledger_runs)."""

from __future__ import annotations

from service.ledger import Ledger
from service.ledger_runs import Run, current_boot, kill_may_count


def test_each_run_finds_the_record_of_the_run_before(ledger: Ledger) -> None:
    assert ledger.begin_run("boot-a") is None, "a new ledger knows of no run"
    assert ledger.begin_run("boot-a") == Run("boot-a", None)
    ledger.run_stopping()
    before = ledger.begin_run("boot-b")
    assert before is not None and before.boot_id == "boot-a" and before.stopping is not None
    assert ledger.begin_run("boot-b") == Run("boot-b", None), "a run begins with no stop"


def test_only_a_kill_in_this_boot_outside_a_stop_may_be_an_images_doing() -> None:
    assert kill_may_count(Run("boot-a", None), "boot-a")
    assert not kill_may_count(Run("boot-a", 1234.5), "boot-a"), "killed while stopping: the stop's timeout"
    assert not kill_may_count(Run("boot-a", None), "boot-b"), "the machine went down"
    assert not kill_may_count(None, "boot-a"), "no record: a ledger from before, or the first run"
    assert not kill_may_count(Run(None, None), None), "no boot id to compare"


def test_the_boot_id_is_this_boots() -> None:
    boot = current_boot()
    assert boot is not None and len(boot) == 36, boot  # Linux: a UUID, new at each boot
    assert current_boot() == boot
