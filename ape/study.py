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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna

from ape.prompt import Prompt

FINGERPRINT_ATTR = "ape_fingerprint"
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
    if storage.startswith("sqlite:///"):
        # SQLite will not create the folder the database file lives in.
        Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        return optuna.storages.RDBStorage(storage)
    except Exception as err:  # SQLAlchemy raises many types for a bad URL or driver
        raise ValueError(f"cannot open storage {storage!r}: {err}") from err


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
        self.trials_loaded = 0
        for trial in self.study.get_trials(
            deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)
        ):
            attrs = trial.user_attrs
            if "prompt" not in attrs:
                continue  # a trial some other tool put in this study
            prompt_key = prompt_key_of(attrs["prompt"])
            for example, score in zip(attrs["examples"], attrs["scores"], strict=True):
                self.scores[(prompt_key, example)] = float(score)
            self.trials_loaded += 1
        self.generations_loaded = sum(
            1 for key in self.study.user_attrs if key.startswith(_GENERATION_PREFIX)
        )

    def record(
        self,
        prompt: Prompt,
        examples: Sequence[str],
        scores: Sequence[float],
        **attrs: Any,
    ) -> None:
        """Commit one trial: `prompt` scored on `examples` (content keys)."""
        values = [float(s) for s in scores]
        trial = optuna.trial.create_trial(
            value=sum(values) / len(values),
            user_attrs={
                "prompt": prompt_to_json(prompt),
                "examples": list(examples),
                "scores": values,
                "n_examples": len(values),
                **attrs,
            },
        )
        self.study.add_trial(trial)
        key = prompt.key()
        for example, score in zip(examples, values, strict=True):
            self.scores[(key, example)] = score

    def generation(self, request: dict[str, Any]) -> dict[str, Any] | None:
        """A stored generation result for `request`, or None."""
        return self.study.user_attrs.get(_GENERATION_PREFIX + content_hash(request, 24))

    def record_generation(self, request: dict[str, Any], result: dict[str, Any]) -> None:
        self.study.set_user_attr(_GENERATION_PREFIX + content_hash(request, 24), result)


def prompt_to_json(prompt: Prompt) -> dict[str, Any]:
    return {"instruction": prompt.instruction, "demos": [[d.input, d.output] for d in prompt.demos]}


def prompt_from_json(data: dict[str, Any]) -> Prompt:
    from ape.task import Example

    demos = tuple(Example(i, o) for i, o in data.get("demos", []))
    return Prompt(data["instruction"], demos)


def prompt_key_of(data: dict[str, Any]) -> str:
    return prompt_from_json(data).key()


def _describe(fingerprint: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(fingerprint.items()))
