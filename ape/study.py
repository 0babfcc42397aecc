"""Trial history on an Optuna study: the cache that makes every run resumable.

Two kinds of trial, so that the study reads right in optuna-dashboard:

- a scoring trial (state PRUNED, see `ape.jobs.SCORED`) holds one prompt's scores on some examples
  (by content key) and their mean as value. It is a minibatch or a chunk of evidence, so it is
  kept out of Optuna's best trial;
- a pool trial (state COMPLETE, user attribute ``kind = "pool"``) records a candidate's mean on the
  whole validation pool the first time it has one. The study's best trial is therefore the
  leaderboard's winner, with its full-pool score.

Generated text lives beside the study, in a study of its own that this one names (see
ape/generation_cache.py), not in this study's attributes. A run that reopens the study replays
scores and text from storage, so a run killed at any moment (even SIGKILL: each trial is its own
committed write) resumes without recomputing anything it had stored.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.trial import TrialState

from ape.generation_cache import GenerationCache
from ape.jobs import SCORED, SPEC_ATTR, STATE_ATTR, JobQueue
from ape.prompt import Prompt
from ape.storage import content_hash, open_storage
from ape.task import Example

__all__ = [
    "SPEC_ATTR",
    "STATE_ATTR",
    "TrialStore",
    "content_hash",
    "open_storage",
    "prompt_from_json",
    "prompt_key_of",
    "prompt_to_json",
]

FINGERPRINT_ATTR = "ape_fingerprint"
POOL_KIND = "pool"  # the `kind` user attribute of a trial holding a candidate's whole-pool mean


class TrialStore:
    """The study a run records into and replays from.

    `fingerprint` names what makes a stored score valid (model, evaluator, task data). A study
    created for a different fingerprint is refused rather than silently mixed.
    """

    def __init__(self, storage: str | None, study_name: str, fingerprint: dict[str, Any]):
        self.storage_url = storage
        self.study_name = study_name
        self.storage = open_storage(storage)
        self.study = optuna.create_study(
            storage=self.storage,
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
        self.jobs = JobQueue(self.study, self.storage)
        self.generations = GenerationCache(self.study, self.storage)
        self.scores: dict[tuple[str, str], float] = {}
        # pair -> what a searcher learned from beside the score (label log-probs), where recorded
        self.details: dict[tuple[str, str], list[float]] = {}
        self.pending: dict[tuple[str, str], str] = {}  # pair -> job id of a queued job
        self.pooled: set[str] = set()  # prompt keys whose whole-pool mean has a trial
        self._collected: set[str] = set()
        self.trials_loaded = self._replay()

    @property
    def generations_loaded(self) -> int:
        return self.generations.loaded

    def _replay(self) -> int:
        """Take every stored trial into the caches; returns how many held scores."""
        loaded = 0
        for trial in self.study.get_trials(deepcopy=False):
            attrs = trial.user_attrs
            if "prompt" not in attrs:
                continue  # a trial some other tool put in this study
            if attrs.get("kind") == POOL_KIND:
                self.pooled.add(prompt_key_of(attrs["prompt"]))
            elif trial.state in (SCORED, TrialState.COMPLETE):
                loaded += self._absorb(trial)
            elif trial.state in (TrialState.WAITING, TrialState.RUNNING) and "job_id" in attrs:
                for example in attrs["examples"]:
                    self.pending[(prompt_key_of(attrs["prompt"]), example)] = attrs["job_id"]
        return loaded

    def _absorb(self, trial: optuna.trial.FrozenTrial) -> int:
        """Take a scoring trial's scores into the cache; 1 if it was one of ours."""
        attrs = trial.user_attrs
        if "prompt" not in attrs or "scores" not in attrs:
            return 0
        self._remember(prompt_key_of(attrs["prompt"]), attrs)
        if "job_id" in attrs:
            self._collected.add(attrs["job_id"])
        return 1

    def record(
        self,
        prompt: Prompt,
        examples: Sequence[str],
        scores: Sequence[float],
        details: Sequence[Sequence[float]] | None = None,
        **attrs: Any,
    ) -> None:
        """Commit one scoring trial: `prompt` scored on `examples` (content keys).

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
        mean = sum(values) / len(values)
        self.study.add_trial(
            optuna.trial.create_trial(state=SCORED, value=mean, user_attrs=user_attrs)
        )
        self._remember(prompt.key(), user_attrs)

    def record_pool(self, prompt: Prompt, mean: float, examples: int, **attrs: Any) -> None:
        """Commit, once per prompt, its mean on the whole validation pool as a COMPLETE trial."""
        if prompt.key() in self.pooled:
            return
        user_attrs = {
            "prompt": prompt_to_json(prompt),
            "kind": POOL_KIND,
            "n_examples": examples,
            **attrs,
        }
        self.study.add_trial(optuna.trial.create_trial(value=mean, user_attrs=user_attrs))
        self.pooled.add(prompt.key())

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
        """Queue `prompt` on `examples` as a waiting trial for a worker (see ape/jobs.py).

        The job carries the examples' text, so a worker needs no copy of the task.
        """
        keys = [e.key() for e in examples]
        job_id = content_hash([prompt.key(), keys], 20)
        self.jobs.put(
            {
                "prompt": prompt_to_json(prompt),
                "examples": keys,
                "job": [[e.input, e.output, list(e.answers)] for e in examples],
                "job_id": job_id,
                **attrs,
            }
        )
        for key in keys:
            self.pending[(prompt.key(), key)] = job_id
        return job_id

    def wait(
        self, job_ids: set[str], poll: float = 0.5, check: Callable[[], None] | None = None
    ) -> None:
        """Block until every job in `job_ids` is scored, taking in the scores as they land.

        While waiting it also fails and re-queues jobs whose worker stopped beating (killed),
        and calls `check()` so a caller can raise if its workers are gone.
        """
        remaining = set(job_ids) - self._collected
        while remaining:
            self.jobs.requeue_stale()
            for trial in self.jobs.finished(remaining):
                self._absorb(trial)
                remaining.discard(trial.user_attrs["job_id"])
            if remaining:
                if check is not None:
                    check()
                time.sleep(poll)

    # ------------------------------------------------------------------ generated text
    def generation(self, request: dict[str, Any]) -> dict[str, Any] | None:
        """A stored generation result for `request`, or None."""
        return self.generations.get(request)

    def record_generation(self, request: dict[str, Any], result: dict[str, Any]) -> None:
        self.generations.put(request, result)


def prompt_to_json(prompt: Prompt) -> dict[str, Any]:
    data = {"instruction": prompt.instruction, "demos": [[d.input, d.output] for d in prompt.demos]}
    if prompt.label_words:  # only when present: older trials and results read the same
        data["label_words"] = prompt.words
    return data


def prompt_from_json(data: dict[str, Any]) -> Prompt:
    demos = tuple(Example(i, o) for i, o in data.get("demos", []))
    return Prompt.from_text(data["instruction"], demos, data.get("label_words"))


def prompt_key_of(data: dict[str, Any]) -> str:
    return prompt_from_json(data).key()


def _describe(fingerprint: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(fingerprint.items()))
