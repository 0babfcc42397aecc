"""Execution accuracy: generate greedily from each prompt and score the answer with a metric."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from ape.evaluators.metrics import METRICS, score

from ape.lm import LanguageModel
from ape.prompt import Prompt
from ape.task import Example, Task

DEFAULT_METRIC = "em"


@dataclass
class GenerationEvaluator:
    """Greedy one-line answers scored by `metric` (default "em"; pass the task's metric)."""

    metric: str | None = None
    max_new_tokens: int = 32
    name = "generation"  # not a field: unannotated
    # Scores are sampled text judged by a metric: no label log-probs, nothing to differentiate.
    offers: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def options_from_task(cls, task: Task) -> dict[str, Any]:
        """The task's metric."""
        return {"metric": task.metric}

    def __post_init__(self) -> None:
        if self.metric is not None and self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; choose one of: {', '.join(METRICS)}")

    def predictions(
        self, lm: LanguageModel, prompts: Sequence[Prompt], examples: Sequence[Example]
    ) -> list[list[str]]:
        """The model's answer per (prompt, example), leading whitespace stripped."""
        if not prompts or not examples:
            return [[] for _ in prompts]
        texts = [prompt.render(ex.input) for prompt in prompts for ex in examples]
        outputs = lm.generate(
            texts, n=1, temperature=0.0, max_new_tokens=self.max_new_tokens, stop=["\n"]
        )
        # The reference continuation is " " + output, so the model's answer starts with a space.
        flat = [out[0].lstrip() for out in outputs]
        width = len(examples)
        return [flat[i : i + width] for i in range(0, len(flat), width)]

    def score(
        self, lm: LanguageModel, prompts: Sequence[Prompt], examples: Sequence[Example]
    ) -> np.ndarray:
        metric = self.metric or DEFAULT_METRIC
        grid = self.predictions(lm, prompts, examples)
        scores = [
            [score(pred, ex.answers, metric) for pred, ex in zip(row, examples, strict=True)]
            for row in grid
        ]
        return np.array(scores, dtype=np.float64).reshape(len(prompts), len(examples))
