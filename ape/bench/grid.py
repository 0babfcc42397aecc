"""The grid: one run per task x searcher x seed, checked before anything runs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ape.bench.config import BenchConfig, ConfigError, SearcherSpec
from ape.result import Result
from ape.task import TaskError


@dataclass(frozen=True)
class Run:
    """One cell of the grid."""

    task: str  # the task's name
    source: str
    searcher: SearcherSpec
    seed: int
    path: Path  # its result JSON

    @property
    def name(self) -> str:
        return f"{safe(self.task)}-{self.searcher.label}-seed{self.seed}"


def plan(config: BenchConfig) -> list[Run]:
    """The grid's runs, task by task; tasks, the evaluator and finished runs are checked first."""
    from ape.evaluation import make_evaluator
    from ape.task import load_task

    names: dict[str, int] = {}
    for i, source in enumerate(config.tasks):
        try:
            task = load_task(source, seed=config.seeds[0])
        except TaskError as err:
            raise ConfigError(f"{config.path}: 'tasks[{i}]': {err}") from None
        if task.name in names:
            raise ConfigError(
                f"{config.path}: 'tasks[{names[task.name]}]' and 'tasks[{i}]' are both named "
                f"{task.name!r}"
            )
        names[task.name] = i
        try:
            make_evaluator(config.evaluator, task)
        except ValueError as err:
            raise ConfigError(f"{config.path}: 'evaluator': {err}") from None
    runs = [
        Run(
            task,
            config.tasks[i],
            spec,
            seed,
            config.out / "runs" / f"{safe(task)}-{spec.label}-seed{seed}.json",  # = Run.name
        )
        for task, i in names.items()
        for spec in config.searchers
        for seed in config.seeds
    ]
    for run in runs:
        if run.path.is_file():
            _check_finished(config, run)
    return runs


def _check_finished(config: BenchConfig, run: Run) -> None:
    """A saved result must come from the same settings, or the summary would mix two benches."""
    result = Result.load(run.path)
    wanted = {
        "task": run.task,
        "searcher": run.searcher.name,
        "seed": run.seed,
        "budget": config.budget,
        "model": config.model,
        "evaluator": config.evaluator,
        "options": _plain(run.searcher.options),
    }
    differ = [k for k, v in wanted.items() if _plain(getattr(result, k)) != v]
    if differ:
        found = ", ".join(f"{k}={_plain(getattr(result, k))!r}" for k in differ)
        asked = ", ".join(f"{k}={wanted[k]!r}" for k in differ)
        raise ConfigError(
            f"{run.path} was run with {found}, but {config.path} asks for {asked}; delete it "
            "(or choose another 'out') to run it again"
        )


def safe(name: str) -> str:
    """A name usable in a file name."""
    return re.sub(r"[^\w.+-]", "_", name)


def _plain(value: Any) -> Any:
    """Tuples as lists, as JSON stores them (to compare a saved result with the config)."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
