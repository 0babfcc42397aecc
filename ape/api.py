"""`optimize()`: from names to objects, through a searcher, to a `Result` with its evidence."""

from __future__ import annotations

import os
import platform
import sys
import time
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from ape.budget import BudgetExhausted, check_counts
from ape.capabilities import check
from ape.evaluation import evaluator_options, make_evaluator, resolve_model, resolve_task
from ape.evaluator_flags import split_options
from ape.lm import LanguageModel
from ape.models import DEFAULT_MODEL
from ape.objective import Objective
from ape.report import build_result
from ape.result import Result
from ape.served import usage_since, usage_totals
from ape.study import TrialStore, content_hash
from ape.task import Task
from ape.task_types import DEFAULT_TEST_EXAMPLES
from ape.worker import LocalWorkers, shared_storage


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; `.result` holds what was scored (its scores are all stored)."""

    def __init__(self, result: Result):
        super().__init__("interrupted")
        self.result = result


def optimize(
    task_or_path: Task | str | os.PathLike,
    model: LanguageModel | str | os.PathLike = DEFAULT_MODEL,
    searcher: str | Any = "whole",
    evaluator: str | Any = "loglik",
    budget: int | None = None,
    seed: int = 0,
    storage: str | None = None,
    study: str | None = None,
    *,
    val_examples: int = 100,
    test_top: int = 3,
    test_examples: int | None = DEFAULT_TEST_EXAMPLES,
    progress: bool = True,
    workers: int = 0,
    length_penalty: float = 0.0,
    metric_evidence: bool = True,
    **options: Any,
) -> Result:
    """Find the prompt that scores best on held-out validation data, and test it.

    The searcher's candidates are selected on the validation split; the `test_top` best are then
    scored once on the test split, next to the task with no instruction. `budget` caps scored
    (prompt, example) pairs plus generated tokens (None: the searcher's own schedule).
    `test_examples` scores them on a seeded sample of that many rows of a larger test split
    (None: every row). With a persistent `storage` (e.g. ``"sqlite:///run.db"``), a run
    interrupted at any moment resumes from what it stored. With `workers` > 0, scoring goes to
    that many local worker processes sharing `storage` (a database URL; more can join from other
    machines, see ape/worker.py). `length_penalty` lowers each validation mean by that much per
    prompt token (ties always go to the shorter prompt). `Result.evidence` compares the best
    prompt with each baseline on test, and with `metric_evidence` also under the task's metric
    by greedy generation. `searcher` and `evaluator` are names or instances; `options` configure
    them (a named evaluator's own, e.g. ``calibrate=True``, go to it); ``label_words="search"``
    has whole, ape or tpe search a classification task's answer words too.
    """
    started = time.perf_counter()
    served = usage_totals()  # what served models had used before this run
    _check_settings(workers, storage, evaluator, length_penalty, budget, test_top, val_examples)
    whole = resolve_task(task_or_path, seed=seed)
    task = whole.sample_test(test_examples, seed)
    own, options = split_options(evaluator, options)  # the evaluator's options, the searcher's
    scorer_options = evaluator_options(evaluator, task, **own)
    scorer = make_evaluator(evaluator, task, **scorer_options)
    search = _checked_searcher(searcher, options, scorer, task)
    lm, loading = _timed_model(model)
    store = _open_store(task, lm, scorer, storage, study, progress)
    pool = _start_workers(store, workers, lm, evaluator, scorer_options) if workers else None
    settings = dict(budget=budget, seed=seed, val_examples=val_examples, progress=progress)
    objective = Objective(
        task, lm, scorer, store, workers=pool, length_penalty=length_penalty, **settings
    )
    objective.seconds.update(loading)  # reported as load_s
    meta = _meta(objective, search, scorer, {**options, **own}, storage, budget, whole)
    metric = partial(_metric_objective, objective, storage) if metric_evidence else None
    try:
        result = _search(search, objective, meta, started, test_top, {"metric_objective": metric})
        result.model_tokens = usage_since(served)
        return result
    finally:
        _close(objective, store, pool)


def _timed_model(model: LanguageModel | str | os.PathLike) -> tuple[LanguageModel, dict]:
    """The model, and {"load": seconds its loading took} ({} for a model object given)."""
    if isinstance(model, LanguageModel):
        return model, {}
    began = time.perf_counter()
    lm = resolve_model(model)
    return lm, {"load": time.perf_counter() - began}


def _close(objective: Objective, store, pool) -> None:
    """Close the objective's resources, then the local workers (after their jobs are done)."""
    objective.close()
    if pool is not None:
        store.jobs.close_for_workers()
        pool.stop()


def _checked_searcher(searcher: str | Any, options: dict[str, Any], scorer, task: Task) -> Any:
    """The searcher, with every check that can fail before the model loads: its name and
    options, an evaluator that cannot serve it, a label-word search without label words, a task
    it cannot search (its optional `check_task`)."""
    search = _searcher(searcher, options)
    check(search, scorer)
    check_label_words(search, scorer)
    if hasattr(search, "check_task"):
        search.check_task(task)
    return search


def check_label_words(search, scorer) -> None:
    """One line when label words are to be searched with an evaluator that scores none."""
    from ape.search.label_words import check_label_words as check_words  # searchers' room

    check_words(search, scorer)


def _searcher(searcher: str | Any, options: dict[str, Any]):
    """The searcher named, built with `options`; or an instance as it is (it has its options)."""
    from ape.search.base import get_searcher  # the face reaches searchers only by name

    if isinstance(searcher, str):
        return get_searcher(searcher, **options)
    if options:
        raise ValueError(f"options are for a searcher named by a string; {searcher!r} has its own")
    return searcher


def _meta(
    objective: Objective, search, scorer, options, storage, budget, whole: Task
) -> dict[str, Any]:
    """What a result records about how it was made (`whole`: the task before its test sample)."""
    return {
        "budget": budget,
        "task": objective.task.name,
        "model": objective.lm.name,
        "searcher": search.name,
        "evaluator": getattr(scorer, "name", type(scorer).__name__),
        "options": _jsonable(options),
        "storage": storage,
        "study": objective.store.study_name,
        "seed": objective.seed,
        "test_examples": len(objective.task.test),
        "test_split_rows": len(whole.test),
        "versions": _versions(),
    }


def _metric_objective(objective: Objective, storage: str | None, name: str) -> Objective:
    """An objective scoring with evaluator `name` in a study of its own beside the run's, so its
    scores resume too."""
    task, lm = objective.task, objective.lm
    scorer = make_evaluator(name, task, **evaluator_options(name, task))
    store = _open_store(task, lm, scorer, storage, f"{objective.store.study_name}.{name}", False)
    settings = dict(seed=objective.seed, val_examples=objective.val_examples)
    return Objective(
        task, lm, scorer, store, progress=objective.progress, budget_bar=False, **settings
    )


def _check_settings(
    workers: int, storage: str | None, evaluator, length_penalty: float, budget, test_top, val
) -> None:
    check_counts(budget=budget, test_top=test_top, val_examples=val)
    if length_penalty < 0:
        raise ValueError(f"length_penalty must be 0 or more, got {length_penalty}")
    if workers and not isinstance(evaluator, str):
        raise ValueError("workers build their own evaluator: name it (e.g. 'loglik') to use them")
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


def _search(
    search, objective: Objective, meta: dict[str, Any], started: float, test_top: int, report
):
    """Run the searcher, then test its best; Ctrl-C returns what was scored inside `Interrupted`."""
    stopped_by_budget = False
    try:
        with objective.timed("search"):
            search.search(objective)
    except BudgetExhausted:
        stopped_by_budget = True
    except KeyboardInterrupt as interrupt:
        result = build_result(objective, meta, started, 0, **report)
        result.interrupted = True
        raise Interrupted(result) from interrupt
    result = build_result(objective, meta, started, test_top, **report)
    result.stopped_by_budget = stopped_by_budget
    return result


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("ape-optimizer", "torch", "transformers", "optuna", "numpy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found
