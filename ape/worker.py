"""Workers: processes, on this machine or others, that score the jobs a run queues in its study.

The scaling path needs nothing but Optuna's storage:

- one process scores everything itself (the default);
- ``ape optimize ... --workers N`` queues each batch of (prompt, examples) pairs as waiting trials
  in the study and starts N local ``ape worker`` processes that take and score them;
- ``ape worker --storage URL --study NAME`` on other machines joins the same study through a shared
  PostgreSQL or MySQL database.

A worker claims a waiting trial by moving it to RUNNING, which the database does atomically (row
lock; on SQLite every transaction takes the write lock first, see ape/study.py), so no job is taken
twice. While it holds jobs, a thread records Optuna heartbeats; a worker that dies (even by SIGKILL)
stops beating, and after the grace period any process fails its jobs and Optuna's
RetryFailedTrialCallback queues them again for another worker. Results are written into the claimed
trial itself, so a job's pairs are stored exactly once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from ape.study import (
    HEARTBEAT_SECONDS,
    SPEC_ATTR,
    STATE_ATTR,
    open_storage,
    prompt_from_json,
    requeue_stale_jobs,
)
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


class _Heartbeat(threading.Thread):
    """Records a heartbeat for every job this worker holds, every HEARTBEAT_SECONDS."""

    def __init__(self, storage):
        super().__init__(daemon=True)
        self.storage = storage
        self.held: set[int] = set()
        self.lock = threading.Lock()
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(HEARTBEAT_SECONDS):
            with self.lock:
                held = list(self.held)
            for trial_id in held:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception:  # a transient database error; the next beat retries
                    continue


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

    rdb = open_storage(shared_storage(storage))
    try:
        handle = optuna.load_study(study_name=study, storage=rdb)
    except KeyError:
        raise ValueError(f"no study {study!r} in {storage}") from None
    spec = _wait_for_spec(handle, idle_timeout, poll)
    lm = load_model(spec["model"], device=device, dtype=spec["dtype"])
    evaluator = get_evaluator(spec["evaluator"], **spec["evaluator_options"])

    heartbeat = _Heartbeat(rdb)
    heartbeat.start()
    done = 0
    idle_since = time.monotonic()
    bar = tqdm(desc="jobs", unit="job", disable=not progress)
    try:
        while True:
            requeue_stale_jobs(handle)
            claimed = _claim(rdb, handle._study_id, batch, heartbeat)
            if not claimed:
                finished = handle.user_attrs.get(STATE_ATTR) == "finished"
                idle = idle_timeout is not None and time.monotonic() - idle_since > idle_timeout
                if finished or idle:
                    return done
                time.sleep(poll)
                continue
            _score_jobs(rdb, claimed, lm, evaluator, heartbeat)
            done += len(claimed)
            bar.update(len(claimed))
            idle_since = time.monotonic()
    finally:
        heartbeat.stopped.set()
        bar.close()


def _wait_for_spec(handle, idle_timeout: float | None, poll: float) -> dict[str, Any]:
    """The run's model and evaluator, written by the coordinator when it starts dispatching."""
    started = time.monotonic()
    while True:
        spec = handle.user_attrs.get(SPEC_ATTR)
        if spec is not None:
            return spec
        if idle_timeout is not None and time.monotonic() - started > idle_timeout:
            raise ValueError(
                f"study {handle.study_name!r} has no run dispatching to workers (start one with "
                "ape optimize ... --workers N)"
            )
        time.sleep(poll)


def _claim(rdb, study_id: int, batch: int, heartbeat: _Heartbeat) -> list:
    """Up to `batch` waiting jobs, each moved to RUNNING by this worker alone."""
    claimed = []
    for trial in rdb.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,)):
        if "job" not in trial.user_attrs:
            continue
        # Beat first: Optuna never fails a RUNNING trial that has no heartbeat, so a worker killed
        # between taking a job and its first beat would leave that job orphaned for good.
        rdb.record_heartbeat(trial._trial_id)
        try:
            taken = rdb.set_trial_state_values(trial._trial_id, TrialState.RUNNING)
        except optuna.exceptions.UpdateFinishedTrialError:
            taken = False
        if taken:
            with heartbeat.lock:
                heartbeat.held.add(trial._trial_id)
            claimed.append(trial)
            if len(claimed) == batch:
                break
    return claimed


def _score_jobs(rdb, trials: Sequence, lm, evaluator, heartbeat: _Heartbeat) -> None:
    from ape.objective import score_grouped

    todo = [
        (
            prompt_from_json(t.user_attrs["prompt"]),
            [Example(i, o, tuple(a)) for i, o, a in t.user_attrs["job"]],
        )
        for t in trials
    ]
    rows = score_grouped(evaluator, lm, todo)
    for trial, row in zip(trials, rows, strict=True):
        values = row.tolist()
        try:
            rdb.set_trial_user_attr(trial._trial_id, "scores", values)
            rdb.set_trial_state_values(
                trial._trial_id, TrialState.COMPLETE, [sum(values) / len(values)]
            )
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # judged dead and re-queued meanwhile; the retry stores these pairs instead
        finally:
            with heartbeat.lock:
                heartbeat.held.discard(trial._trial_id)
