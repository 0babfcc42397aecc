"""The worker protocol on an Optuna study, through the storage's public methods only.

- The coordinator publishes what a worker needs (model, evaluator) as a study attribute, queues
  each (prompt, examples) job as a WAITING trial, and collects the jobs as they finish.
- A worker claims a waiting trial by moving it to RUNNING, which the database does atomically (a
  row lock; on SQLite every transaction takes the write lock first, see ape/storage.py), so no job
  is taken twice. It beats for the jobs it holds; a worker that dies (even by SIGKILL) stops
  beating, and after the grace period any process fails its jobs and Optuna's
  RetryHeartbeatStaleTrialCallback queues them again.
- The worker writes the scores into the claimed trial itself and finishes it in the state of every
  scoring trial (`SCORED`), so a job's pairs are stored exactly once.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import optuna
from optuna.trial import FrozenTrial, TrialState

from ape.storage import HEARTBEAT_SECONDS, open_storage

SPEC_ATTR = "ape_worker_spec"  # what a worker needs to score jobs: model, dtype, evaluator
STATE_ATTR = "ape_state"  # "running" while a coordinator dispatches jobs, then "finished"
# A trial that holds scores of a minibatch (or a chunk of evidence) ends PRUNED, with its mean as
# value: kept, replayed and shown, but never Optuna's (or optuna-dashboard's) best trial, which
# is left to the COMPLETE trials that record a candidate's whole-pool mean (see ape/study.py).
SCORED = TrialState.PRUNED


class Job(NamedTuple):
    """A claimed job: its trial's storage id and user attributes."""

    trial_id: int
    attrs: dict[str, Any]


class JobQueue:
    """The jobs of one study: queued and collected by a coordinator, claimed and scored by
    workers."""

    def __init__(self, study: optuna.Study, storage: optuna.storages.BaseStorage):
        self.study = study
        self.storage = storage
        self.study_id = storage.get_study_id_from_name(study.study_name)
        self._held: set[int] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    @classmethod
    def join(cls, storage: str, study_name: str) -> JobQueue:
        """The queue of an existing study, for a worker."""
        opened = open_storage(storage)
        try:
            study = optuna.load_study(study_name=study_name, storage=opened)
        except KeyError:
            raise ValueError(f"no study {study_name!r} in {storage}") from None
        return cls(study, opened)

    # ------------------------------------------------------------------ the coordinator's side
    def open_for_workers(self, spec: dict[str, Any]) -> None:
        self.study.set_user_attr(SPEC_ATTR, spec)
        self.study.set_user_attr(STATE_ATTR, "running")

    def close_for_workers(self) -> None:
        """Tell the workers the run is over; they exit once no job is left."""
        self.study.set_user_attr(STATE_ATTR, "finished")

    def put(self, attrs: dict[str, Any]) -> None:
        """Queue one job: a waiting trial whose attributes carry everything a worker needs."""
        self.study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, user_attrs=attrs))

    def finished(self, job_ids: set[str]) -> list[FrozenTrial]:
        """The scored trials of these jobs that are done (COMPLETE: stored by an older version)."""
        trials = self.storage.get_all_trials(
            self.study_id, deepcopy=False, states=(SCORED, TrialState.COMPLETE)
        )
        return [
            t for t in trials if t.user_attrs.get("job_id") in job_ids and "scores" in t.user_attrs
        ]

    def requeue_stale(self) -> None:
        """Fail jobs whose worker stopped beating; the storage's callback queues them again."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)

    # ------------------------------------------------------------------ a worker's side
    def spec(self) -> dict[str, Any] | None:
        return self.study.user_attrs.get(SPEC_ATTR)

    def run_finished(self) -> bool:
        return self.study.user_attrs.get(STATE_ATTR) == "finished"

    def claim(self, batch: int) -> list[Job]:
        """Up to `batch` waiting jobs, each moved to RUNNING by this worker alone."""
        claimed: list[Job] = []
        for trial in self.storage.get_all_trials(
            self.study_id, deepcopy=False, states=(TrialState.WAITING,)
        ):
            if "job" not in trial.user_attrs:
                continue
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(
                self.study_id, trial.number
            )
            # Beat first: Optuna never fails a RUNNING trial that has no heartbeat, so a worker
            # killed between taking a job and its first beat would leave that job orphaned.
            self.storage.record_heartbeat(trial_id)
            try:
                taken = self.storage.set_trial_state_values(trial_id, TrialState.RUNNING)
            except optuna.exceptions.UpdateFinishedTrialError:
                taken = False
            if taken:
                with self._lock:
                    self._held.add(trial_id)
                claimed.append(Job(trial_id, trial.user_attrs))
                if len(claimed) == batch:
                    break
        return claimed

    def complete(self, job: Job, scores: Sequence[float]) -> None:
        """Store a job's scores in its own trial; a job re-queued meanwhile is left to its retry."""
        values = [float(s) for s in scores]
        try:
            self.storage.set_trial_user_attr(job.trial_id, "scores", values)
            self.storage.set_trial_state_values(job.trial_id, SCORED, [sum(values) / len(values)])
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # judged dead and re-queued meanwhile; the retry stores these pairs instead
        finally:
            with self._lock:
                self._held.discard(job.trial_id)

    def start_heartbeat(self) -> threading.Thread:
        """Beat for every held job every HEARTBEAT_SECONDS, until `stop_heartbeat`."""
        thread = threading.Thread(target=self._beat, daemon=True)
        thread.start()
        return thread

    def stop_heartbeat(self) -> None:
        self._stopped.set()

    def _beat(self) -> None:
        while not self._stopped.wait(HEARTBEAT_SECONDS):
            with self._lock:
                held = list(self._held)
            for trial_id in held:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception:  # a transient database error; the next beat retries
                    continue
