"""A test-only evaluator that counts the (prompt, example) pairs it scores, across processes.

``counted`` delegates to the evaluator named by ``APE_COUNT_INNER`` (default ``loglik``): same
scores, same capabilities, same options from the task. Each scoring call appends one line,
``PID TIME PAIRS``, to the file named by ``APE_COUNT_PAIRS`` (if set). The chaos test
(tests/test_chaos.py) reads it to count the pairs computed by a run that was killed and resumed:
a killed process saves no result, but its lines are on disk.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from ape.evaluators.base import EVALUATORS

from ape.capabilities import offered, task_options
from ape.lm import LanguageModel
from ape.prompt import Prompt
from ape.task import Example, Task

COUNT_ENV = "APE_COUNT_PAIRS"
INNER_ENV = "APE_COUNT_INNER"


def _inner_class() -> type:
    return EVALUATORS.load(os.environ.get(INNER_ENV, "loglik"))


def _count(pairs: int) -> None:
    path = os.environ.get(COUNT_ENV)
    if path and pairs:
        # One short append per call: whole lines even when the process is killed mid-run.
        with open(path, "a") as out:
            out.write(f"{os.getpid()} {time.time():.6f} {pairs}\n")


class CountedEvaluator:
    """The inner evaluator's scores; every scored pair is counted in $APE_COUNT_PAIRS."""

    name = "counted"
    offers = offered(_inner_class())

    def __init__(self, **options: Any) -> None:
        self.inner = _inner_class()(**options)
        self.offers = offered(self.inner)

    def __repr__(self) -> str:
        # A study's fingerprint names its evaluator by repr: equal evaluators, equal text.
        return f"{type(self).__name__}({self.inner!r})"

    @classmethod
    def options_from_task(cls, task: Task) -> dict[str, Any]:
        return task_options(_inner_class(), task)

    def score(
        self, lm: LanguageModel, prompts: Sequence[Prompt], examples: Sequence[Example]
    ) -> np.ndarray:
        scores = self.inner.score(lm, prompts, examples)
        _count(len(prompts) * len(examples))
        return scores

    def __getattr__(self, attribute: str) -> Any:
        # What a capability promises beyond scoring (resolve_labels, training_loss, ...).
        if attribute == "inner":  # not set yet: no recursion while unpickling or copying
            raise AttributeError(attribute)
        found = getattr(self.inner, attribute)
        if attribute != "label_logprobs":
            return found

        def counted(lm: LanguageModel, prompts: Sequence[Prompt], examples: Sequence[Example]):
            grid = found(lm, prompts, examples)
            _count(len(prompts) * len(examples))
            return grid

        return counted
