"""`optimize()`: from names to objects, through a searcher, to a `Result` with its evidence."""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np

from ape.device import describe_machine
from ape.evaluation import evaluator_options, make_evaluator, resolve_model, resolve_task
from ape.lm import LanguageModel
from ape.models import DEFAULT_MODEL
from ape.objective import BudgetExhausted, Candidate, Objective
from ape.prompt import Prompt
from ape.result import Entry, Result
from ape.study import SPEC_ATTR, STATE_ATTR, TrialStore, content_hash
from ape.task import Task
from ape.worker import LocalWorkers, shared_storage


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; `.result` holds what was scored (its scores are all stored)."""

    def __init__(self, result: Result):
        super().__init__("interrupted")
        self.result = result


def optimize(
    task_or_path: Task | str | os.PathLike,
    model: LanguageModel | str | os.PathLike = DEFAULT_MODEL,
    searcher: str = "ape",
    evaluator: str = "loglik",
    budget: int | None = None,
    seed: int = 0,
    storage: str | None = None,
    study: str | None = None,
    *,
    val_examples: int = 100,
    test_top: int = 3,
    test_examples: int | None = None,
    progress: bool = True,
    workers: int = 0,
    **options: Any,
) -> Result:
    """Find the prompt that scores best on held-out validation data, and test it.

    The searcher's candidates are selected on the validation split; the `test_top` best are then
    scored once on the test split, next to the task with no instruction. `budget` caps scored
    (prompt, example) pairs plus generated tokens (None: the searcher's own schedule).
    `test_examples` scores them on a seeded sample of that many test rows (default: all). With a
    persistent `storage` (e.g. ``"sqlite:///run.db"``), a run interrupted at any moment resumes
    from what it stored. With `workers` > 0, scoring goes to that many local worker processes
    sharing `storage` (a database URL; more can join from other machines, see ape/worker.py).
    `options` are the searcher's hyperparameters.
    """
    from ape.search.base import get_searcher  # the face reaches searchers only by name

    started = time.perf_counter()
    if budget is not None and budget <= 0:
        raise ValueError(f"budget must be a positive number of units, got {budget}")
    if test_top <= 0:
        raise ValueError(f"test_top must be positive, got {test_top}")
    if workers < 0:
        raise ValueError(f"workers must be 0 or more, got {workers}")
    if workers:
        shared_storage(storage)
    task = resolve_task(task_or_path, seed=seed)
    if test_examples is not None:
        task = task.sample_test(test_examples, seed)
    scorer_options = evaluator_options(evaluator, task)
    scorer = make_evaluator(evaluator, task, **scorer_options)
    search = get_searcher(searcher, **options)  # bad names and options fail before the model loads
    lm = resolve_model(model)

    fingerprint = {
        "model": lm.name,
        "dtype": str(getattr(getattr(lm, "model", None), "dtype", "")),
        "evaluator": repr(scorer),
        "task": task.name,
    }
    study_name = study or f"{task.name}-{content_hash(fingerprint, 10)}"
    store = TrialStore(storage, study_name, fingerprint)
    if progress and (store.trials_loaded or store.generations_loaded):
        print(
            f"resuming study {study_name!r} from {storage}: {store.trials_loaded} scored trials "
            f"and {store.generations_loaded} generations stored",
            file=sys.stderr,
        )
    pool = None
    if workers:
        store.study.set_user_attr(
            SPEC_ATTR,
            {
                "model": lm.name,
                "dtype": fingerprint["dtype"].removeprefix("torch.") or None,
                "evaluator": evaluator,
                "evaluator_options": scorer_options,
            },
        )
        store.study.set_user_attr(STATE_ATTR, "running")
        pool = LocalWorkers(workers, storage, study_name, device=str(lm.device))
    objective = Objective(
        task,
        lm,
        scorer,
        store,
        budget=budget,
        seed=seed,
        val_examples=val_examples,
        progress=progress,
        workers=pool,
    )
    meta = {
        "budget": budget,
        "task": task.name,
        "model": lm.name,
        "searcher": searcher,
        "evaluator": evaluator,
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
        "storage": storage,
        "study": study_name,
        "seed": seed,
        "test_examples": len(task.test),
    }
    try:
        result = _search(search, objective, meta, started, test_top)
    finally:
        objective.close()
        if pool is not None:
            store.study.set_user_attr(STATE_ATTR, "finished")
            pool.stop()
    return result


def _search(search, objective: Objective, meta: dict[str, Any], started: float, test_top: int):
    """Run the searcher, then test its best; Ctrl-C returns what was scored inside `Interrupted`."""
    stopped_by_budget = False
    try:
        with objective.timed("search"):
            search.search(objective)
    except BudgetExhausted:
        stopped_by_budget = True
    except KeyboardInterrupt as interrupt:
        result = _result(objective, meta, started, tested=0)
        result.interrupted = True
        raise Interrupted(result) from interrupt
    result = _result(objective, meta, started, tested=test_top)
    result.stopped_by_budget = stopped_by_budget
    return result


def standing(candidate: Candidate, pool: Sequence[str] | None = None) -> tuple[int, float]:
    """(validation examples, mean score) a candidate is ranked by.

    A candidate scored on the whole validation `pool` (example keys) is judged on exactly that
    pool, so all such candidates are compared on the same examples; any other candidate on all
    it has seen.
    """
    if pool and all(k in candidate.val for k in pool):
        return len(pool), float(np.mean([candidate.val[k] for k in pool]))
    return len(candidate.val), candidate.val_score


def ranked(candidates: list[Candidate], pool: Sequence[str] | None = None) -> list[Candidate]:
    """Candidates best first: those scored on the most validation examples lead, by mean score.

    A mean over fewer examples is noisier, so it never outranks a fully evaluated candidate.
    """
    scored = [c for c in candidates if c.val]
    return sorted(scored, key=lambda c: tuple(-x for x in standing(c, pool)))


def _result(objective: Objective, meta: dict[str, Any], started: float, tested: int) -> Result:
    searched = list(objective.candidates.values())
    pool = [e.key() for e in objective.val_pool]
    order = ranked(searched, pool)
    reference = Prompt("")
    test_rows: dict[str, float] = {}
    if tested and order:
        prompts = [c.prompt for c in order[:tested]]
        prompts += [reference] if reference.key() not in {p.key() for p in prompts} else []
        objective.score_evidence([reference], "val")
        for prompt, row in zip(prompts, objective.score_evidence(prompts, "test"), strict=True):
            test_rows[prompt.key()] = float(np.mean(row))
    elif tested:
        raise ValueError(
            "nothing was scored: the budget is too small for this searcher "
            f"(used {objective.budget.used} of {objective.budget.limit})"
        )

    def entry(c: Candidate) -> Entry:
        examples, score = standing(c, pool)
        return Entry.of(
            c.prompt,
            val_score=score if c.val else None,
            val_examples=examples,
            test_score=test_rows.get(c.prompt.key()),
            origin=c.origin,
        )

    leaderboard = [entry(c) for c in order]
    ref = objective.candidates.get(reference.key())
    return Result(
        best=leaderboard[0] if leaderboard else None,
        leaderboard=leaderboard,
        budget_used=objective.budget.used,
        history=[list(point) for point in objective.history],
        budget_detail={
            "pairs": objective.budget.pairs,
            "tokens": objective.budget.tokens,
            "pairs_computed": objective.computed_pairs,
        },
        reference=entry(ref) if ref is not None and ref.val else None,
        timings={
            "total_s": round(time.perf_counter() - started, 3),
            **{f"{k}_s": round(v, 3) for k, v in objective.seconds.items()},
        },
        versions=_versions(),
        machine=describe_machine(getattr(objective.lm, "device", "cpu")),
        extras=dict(objective.extras),
        artifacts=dict(objective.artifacts),
        **meta,
    )


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("ape-optimizer", "torch", "transformers", "optuna", "numpy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found
