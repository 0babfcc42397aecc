"""`evaluate()`: the mean score of given instructions on a task split.

Users check their own prompts with it, and every searcher's result is compared through it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ape.capabilities import task_options
from ape.lm import LanguageModel
from ape.models import DEFAULT_MODEL, load_model
from ape.prefix import score_prompts
from ape.prompt import Prompt
from ape.task import Task, load_task


def resolve_task(task: Task | str | os.PathLike, seed: int = 0) -> Task:
    """A Task as given, or loaded from a path or bundled task name."""
    return task if isinstance(task, Task) else load_task(task, seed=seed)


def resolve_model(model: LanguageModel | str | os.PathLike = DEFAULT_MODEL) -> LanguageModel:
    """A model object as given, or loaded by name or path."""
    return model if isinstance(model, LanguageModel) else load_model(model)


def evaluator_options(name: str | Any, task: Task, **options: Any) -> dict[str, Any]:
    """`options` with what evaluator `name` takes from the task (its `options_from_task`: a
    metric, the labels) filled in where not given; none for an evaluator instance."""
    from ape.evaluators.base import EVALUATORS  # the face reaches evaluators only by name

    if not isinstance(name, str):
        return {}

    taken = task_options(EVALUATORS.load(name), task)
    return {**options, **{k: v for k, v in taken.items() if k not in options}}


def make_evaluator(name: str | Any, task: Task, **options: Any):
    """The named evaluator, with the task's metric and labels filled in where it takes them.

    An evaluator instance (anything with `score`) is used as it is."""
    from ape.evaluators.base import get_evaluator  # the face reaches evaluators only by name

    if not isinstance(name, str):
        if options:
            raise ValueError(
                "options are for an evaluator named by a string; configure the "
                f"instance {name!r} itself"
            )
        return name

    return get_evaluator(name, **evaluator_options(name, task, **options))


def evaluate(
    task: Task | str | os.PathLike,
    instructions: Sequence[str | Prompt],
    model: LanguageModel | str | os.PathLike = DEFAULT_MODEL,
    evaluator: str | Any = "loglik",
    split: str = "test",
    seed: int = 0,
    **evaluator_options: Any,
) -> list[float]:
    """Mean score of each instruction on `split` (higher is better), in the order given.

    An item may also be a `Prompt`, e.g. a loaded soft prompt's `SoftPrompt.prompt()`.
    """
    task = resolve_task(task, seed=seed)
    examples = task.split(split)
    scorer = make_evaluator(evaluator, task, **evaluator_options)
    lm = resolve_model(model)
    prompts = [p if isinstance(p, Prompt) else Prompt.from_text(p) for p in instructions]
    scores = score_prompts(scorer, lm, prompts, examples)
    return [float(row.mean()) for row in scores]
