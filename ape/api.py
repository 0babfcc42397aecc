"""`optimize()`: from names to objects, through a searcher, to a `Result` with its evidence."""

from __future__ import annotations

import os
import platform
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np

from ape.budget import BudgetExhausted, check_counts
from ape.capabilities import check
from ape.device import describe_machine
from ape.evaluation import evaluator_options, make_evaluator, resolve_model, resolve_task
from ape.lm import LanguageModel
from ape.models import DEFAULT_MODEL
from ape.objective import Objective
from ape.prompt import Prompt
from ape.ranking import Candidate, ranked, standing
from ape.result import Entry, Result
from ape.study import TrialStore, content_hash
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
    check_counts(budget=budget, test_top=test_top, val_examples=val_examples)
    _check_workers(workers, storage)
    task = resolve_task(task_or_path, seed=seed)
    task = task if test_examples is None else task.sample_test(test_examples, seed)
    scorer_options = evaluator_options(evaluator, task)
    scorer = make_evaluator(evaluator, task, **scorer_options)
    search = get_searcher(searcher, **options)  # bad names and options fail before the model loads
    check(search, scorer)  # so does an evaluator that cannot serve the searcher
    lm = resolve_model(model)

    store = _open_store(task, lm, scorer, storage, study, progress)
    pool = _start_workers(store, workers, lm, evaluator, scorer_options) if workers else None
    settings = dict(budget=budget, seed=seed, val_examples=val_examples, progress=progress)
    objective = Objective(task, lm, scorer, store, workers=pool, **settings)
    meta = {"budget": budget, "task": task.name, "model": lm.name, "searcher": searcher}
    meta.update(evaluator=evaluator, options=_jsonable(options), storage=storage)
    meta.update(study=store.study_name, seed=seed, test_examples=len(task.test))
    try:
        return _search(search, objective, meta, started, test_top)
    finally:
        objective.close()
        if pool is not None:
            store.jobs.close_for_workers()
            pool.stop()


def _check_workers(workers: int, storage: str | None) -> None:
    if workers < 0:
        raise ValueError(f"workers must be 0 or more, got {workers}")
    if workers:
        shared_storage(storage)


def _fingerprint(lm: LanguageModel, scorer, task: Task) -> dict[str, str]:
    """What makes a stored score valid: a study recorded for another fingerprint is refused."""
    return {
        "model": lm.name,
        "dtype": _dtype(lm),
        "evaluator": repr(scorer),
        "task": task.name,
    }


def _dtype(lm: LanguageModel) -> str:
    return str(getattr(getattr(lm, "model", None), "dtype", ""))


def _open_store(
    task: Task, lm: LanguageModel, scorer, storage: str | None, study: str | None, progress: bool
) -> TrialStore:
    """The run's study: named by its fingerprint unless `study` names it; says when it resumes."""
    fingerprint = _fingerprint(lm, scorer, task)
    study_name = study or f"{task.name}-{content_hash(fingerprint, 10)}"
    store = TrialStore(storage, study_name, fingerprint)
    if progress and (store.trials_loaded or store.generations_loaded):
        print(
            f"resuming study {study_name!r} from {storage}: {store.trials_loaded} scored trials "
            f"and {store.generations_loaded} generations stored",
            file=sys.stderr,
        )
    return store


def _start_workers(
    store: TrialStore, count: int, lm: LanguageModel, evaluator: str, options: dict[str, Any]
) -> LocalWorkers:
    """Publish what a worker needs in the study, then start `count` local workers on it."""
    spec = {
        "model": lm.name,
        "dtype": _dtype(lm).removeprefix("torch.") or None,
        "evaluator": evaluator,
        "evaluator_options": options,
    }
    store.jobs.open_for_workers(spec)
    return LocalWorkers(count, store.storage_url, store.study_name, device=str(lm.device))


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}


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
