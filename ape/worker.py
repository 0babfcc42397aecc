"""Workers: processes, on this machine or others, that score the jobs a run queues in its study.

The scaling path needs nothing but Optuna's storage:

- one process scores everything itself (the default);
- ``ape optimize ... --workers N`` queues each batch of (prompt, examples) pairs as waiting trials
  in the study and starts N local ``ape worker`` processes that take and score them;
- ``ape worker --storage URL --study NAME`` on other machines joins the same study through a shared
  PostgreSQL or MySQL database.

The protocol (claiming, heartbeats, results, re-queueing a dead worker's jobs) is the study's own,
in ape/jobs.py; this module starts workers and runs that protocol's loop.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from ape.dispatch import score_grouped
from ape.jobs import Job, JobQueue
from ape.study import prompt_from_json
from ape.task import Example


def shared_storage(storage: str | None) -> str:
    """`storage` if processes can share it with heartbeats (a database URL); else an error."""
    if storage is None or storage == "memory" or "://" not in storage:
        raise ValueError(
            "workers share the run through a database: pass --storage sqlite:///FILE.db (one "
            "machine) or a postgresql:// or mysql:// URL (many machines), not "
            f"{storage or 'memory'!r}"
        )
    return storage


class LocalWorkers:
    """N `ape worker` subprocesses for one study; `check()` raises if all of them have died."""

    def __init__(self, count: int, storage: str, study: str, device: str | None = None):
        command = [sys.executable, "-m", "ape", "worker", "--storage", storage, "--study", study]
        command += ["--quiet"] + (["--device", device] if device else [])
        # Split the cores between the workers; oversubscribed threads spin and slow all of them.
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // count)))
        # stderr goes to files, not pipes: a pipe nobody reads fills up and blocks the worker.
        self.logs = [tempfile.TemporaryFile(mode="w+") for _ in range(count)]
        self.processes = [
            subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True, env=env)
            for log in self.logs
        ]

    def check(self) -> None:
        codes = [p.poll() for p in self.processes]
        if all(code is not None for code in codes):
            last = "no error output"
            for log in self.logs:
                log.seek(0)
                lines = log.read().strip().splitlines()
                last = lines[-1] if lines else last
            raise RuntimeError(f"all {len(codes)} workers exited (codes {codes}): {last}")

    def stop(self, timeout: float = 30.0) -> None:
        """Wait for the workers to see the run finished; terminate any that do not."""
        deadline = time.monotonic() + timeout
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.terminate()
                process.wait()
        for log in self.logs:
            log.close()


def run_worker(
    storage: str,
    study: str,
    *,
    batch: int = 16,
    poll: float = 0.5,
    idle_timeout: float | None = None,
    device: str | None = None,
    progress: bool = True,
) -> int:
    """Score queued jobs of `study` until its run is finished (or idle for `idle_timeout` s).

    Returns the number of jobs this worker completed.
    """
    from ape.evaluators.base import get_evaluator
    from ape.models import load_model

    queue = JobQueue.join(shared_storage(storage), study)
    spec = _wait_for_spec(queue, idle_timeout, poll)
    lm = load_model(spec["model"], device=device, dtype=spec["dtype"])
    evaluator = get_evaluator(spec["evaluator"], **spec["evaluator_options"])

    queue.start_heartbeat()
    done = 0
    idle_since = time.monotonic()
    bar = tqdm(desc="jobs", unit="job", disable=not progress)
    try:
        while True:
            queue.requeue_stale()
            claimed = queue.claim(batch)
            if not claimed:
                idle = idle_timeout is not None and time.monotonic() - idle_since > idle_timeout
                if queue.run_finished() or idle:
                    return done
                time.sleep(poll)
                continue
            _score_jobs(queue, claimed, lm, evaluator)
            done += len(claimed)
            bar.update(len(claimed))
            idle_since = time.monotonic()
    finally:
        queue.stop_heartbeat()
        bar.close()


def _wait_for_spec(queue: JobQueue, idle_timeout: float | None, poll: float) -> dict[str, Any]:
    """The run's model and evaluator, written by the coordinator when it starts dispatching."""
    started = time.monotonic()
    while True:
        spec = queue.spec()
        if spec is not None:
            return spec
        if idle_timeout is not None and time.monotonic() - started > idle_timeout:
            raise ValueError(
                f"study {queue.study.study_name!r} has no run dispatching to workers (start one "
                "with ape optimize ... --workers N)"
            )
        time.sleep(poll)


def _score_jobs(queue: JobQueue, jobs: Sequence[Job], lm, evaluator) -> None:
    todo = [
        (
            prompt_from_json(job.attrs["prompt"]),
            [Example(i, o, tuple(a)) for i, o, a in job.attrs["job"]],
        )
        for job in jobs
    ]
    for job, row in zip(jobs, score_grouped(evaluator, lm, todo), strict=True):
        queue.complete(job, row.tolist())
