"""`sinkwatch run` whose workers, on a source named *poison*, kill the whole service: the daemon first, then
themselves, as an out-of-memory kill of its control group does (systemd's ``OOMPolicy=kill``, a Kubernetes
container). A source named *slow* is held in its worker while the file named by $SINKWATCH_TEST_HOLD exists.
Every other job is the real one. Run as ``python -m tests.faults.service_killer run ...``; the spawned workers
import this module again, under another name, for its job function.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import Future
from pathlib import Path

from service import daemon
from service.cli import main
from service.pool import WorkerPool, run_job
from service.runner import Job, Outcome

HOLD = "SINKWATCH_TEST_HOLD"


def run_or_kill_service(job: Job) -> Outcome:
    name = Path(job.key).name
    if "poison" in name:
        os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    hold = os.environ.get(HOLD)
    while "slow" in name and hold and os.path.exists(hold):
        time.sleep(0.05)
    return run_job(job)


class ServiceKillingPool(WorkerPool):
    def submit(self, job: Job) -> Future[Outcome]:
        return self._executor.submit(run_or_kill_service, job)


if __name__ == "__main__":
    daemon.WorkerPool = ServiceKillingPool  # type: ignore[attr-defined]
    raise SystemExit(main())
