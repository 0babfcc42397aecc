"""Trial history on an Optuna study: the cache that makes every run resumable.

Each scored candidate is a completed trial whose user attributes hold the prompt, the examples it
was scored on (by content key), their scores and the budget spent so far. Generated text (proposal
and resampling outputs) is kept as study user attributes keyed by a hash of the request. A run that
reopens the study replays both from storage, so a run killed at any moment (even SIGKILL: each
trial is its own committed write) resumes without recomputing anything it had stored.

Storage is Optuna's: ``None`` or ``"memory"`` keeps nothing after the process, an RDB URL such as
``sqlite:///run.db`` or ``postgresql://...`` persists, and a path ending in ``.log`` is a journal
file.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from ape.prompt import Prompt
from ape.task import Example

FINGERPRINT_ATTR = "ape_fingerprint"
SPEC_ATTR = "ape_worker_spec"  # what a worker needs to score jobs: model, dtype, evaluator
STATE_ATTR = "ape_state"  # "running" while a coordinator dispatches jobs, then "finished"
HEARTBEAT_SECONDS = 2
GRACE_SECONDS = 10
_GENERATION_PREFIX = "generation:"

optuna.logging.set_verbosity(optuna.logging.WARNING)


def content_hash(value: Any, length: int = 16) -> str:
    """A short stable hash of a JSON-serialisable value."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:length]


def open_storage(storage: str | None) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL, a journal file path (``*.log``), or None/"memory"."""
    if storage is None or storage == "memory":
        return optuna.storages.InMemoryStorage()
    if storage.endswith(".log") and "://" not in storage:
        Path(storage).parent.mkdir(parents=True, exist_ok=True)
        backend = optuna.storages.journal.JournalFileBackend(storage)
        return optuna.storages.JournalStorage(backend)
    sqlite = storage.startswith("sqlite:///")
    if sqlite:
        # SQLite will not create the folder the database file lives in.
        Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():  # heartbeats and their retry callback are "experimental"
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            rdb = optuna.storages.RDBStorage(
                storage,
                engine_kwargs={"connect_args": {"timeout": 60}} if sqlite else None,
                # Workers beat while they hold a job; a job whose worker stopped beating for
                # GRACE_SECONDS is failed and re-queued (see ape/worker.py).
                heartbeat_interval=HEARTBEAT_SECONDS,
                grace_period=GRACE_SECONDS,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=None
                ),
            )
    except Exception as err:  # SQLAlchemy raises many types for a bad URL or driver
        raise ValueError(f"cannot open storage {storage!r}: {err}") from err
    if sqlite:
        _serialize_sqlite(rdb.engine)
    return rdb


def requeue_stale_jobs(study: optuna.Study) -> None:
    """Fail jobs whose worker stopped beating; the storage's callback queues them again."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _serialize_sqlite(engine) -> None:
    """Make every SQLite transaction take the write lock up front (BEGIN IMMEDIATE).

    Python's sqlite3 driver otherwise opens a transaction only at the first write, after the
    read, so two workers could both read a job as waiting and both claim it. PostgreSQL and MySQL
    lock the row (SELECT ... FOR UPDATE) and need nothing.
    """
    import sqlalchemy

    @sqlalchemy.event.listens_for(engine, "connect")
    def _no_implicit_transactions(connection, _record) -> None:
        connection.isolation_level = None

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin_immediate(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # pooled connections were opened before the hooks


class TrialStore:
    """The study a run records into and replays from.

    `fingerprint` names what makes a stored score valid (model, evaluator, task data). A study
    created for a different fingerprint is refused rather than silently mixed.
    """

    def __init__(self, storage: str | None, study_name: str, fingerprint: dict[str, Any]):
        self.storage_url = storage
        self.study_name = study_name
        self.study = optuna.create_study(
            storage=open_storage(storage),
            study_name=study_name,
            direction="maximize",
            load_if_exists=True,
        )
        stored = self.study.user_attrs.get(FINGERPRINT_ATTR)
        if stored is None:
            self.study.set_user_attr(FINGERPRINT_ATTR, fingerprint)
        elif stored != fingerprint:
            raise ValueError(
                f"study {study_name!r} in {storage} was recorded for {_describe(stored)}, not "
                f"{_describe(fingerprint)}; pass another study name (--study)"
            )
        self.scores: dict[tuple[str, str], float] = {}
        # pair -> what a searcher learned from beside the score (label log-probs), where recorded
        self.details: dict[tuple[str, str], list[float]] = {}
        self.trials_loaded = 0
        self.pending: dict[tuple[str, str], str] = {}  # pair -> job id of a queued job
        self._collected: set[str] = set()
        for trial in self.study.get_trials(deepcopy=False):
            if trial.state == TrialState.COMPLETE:
                self.trials_loaded += self._absorb(trial)
            elif trial.state in (TrialState.WAITING, TrialState.RUNNING):
                self._note_pending(trial)
        self.generations_loaded = sum(
            1 for key in self.study.user_attrs if key.startswith(_GENERATION_PREFIX)
        )

    def _absorb(self, trial: optuna.trial.FrozenTrial) -> int:
        """Take a completed trial's scores into the cache; 1 if it was one of ours."""
        attrs = trial.user_attrs
        if "prompt" not in attrs or "scores" not in attrs:
            return 0  # a trial some other tool put in this study
        self._remember(prompt_key_of(attrs["prompt"]), attrs)
        if "job_id" in attrs:
            self._collected.add(attrs["job_id"])
        return 1

    def _note_pending(self, trial: optuna.trial.FrozenTrial) -> None:
        attrs = trial.user_attrs
        if "job_id" in attrs and "prompt" in attrs:
            prompt_key = prompt_key_of(attrs["prompt"])
            for example in attrs["examples"]:
                self.pending[(prompt_key, example)] = attrs["job_id"]

    def record(
        self,
        prompt: Prompt,
        examples: Sequence[str],
        scores: Sequence[float],
        details: Sequence[Sequence[float]] | None = None,
        **attrs: Any,
    ) -> None:
        """Commit one trial: `prompt` scored on `examples` (content keys).

        `details`, one list of floats per example, are stored too and replayed into `details`.
        """
        values = [float(s) for s in scores]
        if details is not None:
            attrs["details"] = [[float(x) for x in d] for d in details]
        user_attrs = {
            "prompt": prompt_to_json(prompt),
            "examples": list(examples),
            "scores": values,
            "n_examples": len(values),
            **attrs,
        }
        self.study.add_trial(
            optuna.trial.create_trial(value=sum(values) / len(values), user_attrs=user_attrs)
        )
        self._remember(prompt.key(), user_attrs)

    def _remember(self, prompt_key: str, attrs: dict[str, Any]) -> None:
        """Cache a trial's scores (and details, when it has them) by (prompt, example) key."""
        for example, score in zip(attrs["examples"], attrs["scores"], strict=True):
            self.scores[(prompt_key, example)] = float(score)
            self.pending.pop((prompt_key, example), None)
        if "details" in attrs:
            for example, detail in zip(attrs["examples"], attrs["details"], strict=True):
                self.details[(prompt_key, example)] = detail

    # ------------------------------------------------------------------ jobs for workers
    def submit(self, prompt: Prompt, examples: Sequence[Example], **attrs: Any) -> str:
        """Queue `prompt` on `examples` as a waiting trial for a worker (see ape/worker.py).

        The job carries the examples' text, so a worker needs no copy of the task.
        """
        keys = [e.key() for e in examples]
        job_id = content_hash([prompt.key(), keys], 20)
        trial = optuna.trial.create_trial(
            state=TrialState.WAITING,
            user_attrs={
                "prompt": prompt_to_json(prompt),
                "examples": keys,
                "job": [[e.input, e.output, list(e.answers)] for e in examples],
                "job_id": job_id,
                **attrs,
            },
        )
        self.study.add_trial(trial)
        for key in keys:
            self.pending[(prompt.key(), key)] = job_id
        return job_id

    def wait(self, job_ids: set[str], poll: float = 0.5, check=None) -> None:
        """Block until every job in `job_ids` is complete, taking in the scores as they land.

        While waiting it also fails and re-queues jobs whose worker stopped beating (killed),
        and calls `check()` so a caller can raise if its workers are gone.
        """
        remaining = set(job_ids) - self._collected
        storage, study_id = self.study._storage, self.study._study_id
        while remaining:
            requeue_stale_jobs(self.study)
            for trial in storage.get_all_trials(
                study_id, deepcopy=False, states=(TrialState.COMPLETE,)
            ):
                if trial.user_attrs.get("job_id") in remaining:
                    self._absorb(trial)
                    remaining.discard(trial.user_attrs["job_id"])
            if remaining:
                if check is not None:
                    check()
                time.sleep(poll)

    def generation(self, request: dict[str, Any]) -> dict[str, Any] | None:
        """A stored generation result for `request`, or None."""
        return self.study.user_attrs.get(_GENERATION_PREFIX + content_hash(request, 24))

    def record_generation(self, request: dict[str, Any], result: dict[str, Any]) -> None:
        self.study.set_user_attr(_GENERATION_PREFIX + content_hash(request, 24), result)


def prompt_to_json(prompt: Prompt) -> dict[str, Any]:
    return {"instruction": prompt.instruction, "demos": [[d.input, d.output] for d in prompt.demos]}


def prompt_from_json(data: dict[str, Any]) -> Prompt:
    demos = tuple(Example(i, o) for i, o in data.get("demos", []))
    return Prompt(data["instruction"], demos)


def prompt_key_of(data: dict[str, Any]) -> str:
    return prompt_from_json(data).key()


def _describe(fingerprint: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(fingerprint.items()))
