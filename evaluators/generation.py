"""Execution accuracy: generate greedily from each prompt and score the answer with a metric."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from ape.evaluators.metrics import FIRST_SENTENCE, METRICS, WHOLE_ANSWER, score

from ape.lm import LanguageModel
from ape.prompt import Prompt
from ape.task import Example, Task

DEFAULT_METRIC = "em"


@dataclass
class GenerationEvaluator:
    """Greedy one-line answers scored by `metric` (default "em"; pass the task's metric).

    At most `max_new_tokens` tokens per answer; under em and es, at most twice the longest
    reference answer of the rows plus 4 tokens (a longer answer cannot match; a 135M model
    otherwise rambles to the limit, and one rambling row holds up its whole batch).
    """

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
        # An answer is one line; under a metric that scores only the first sentence, one
        # sentence: the rest would change no score, and a 135M model rambles.
        stop = ["\n", "."] if (self.metric or DEFAULT_METRIC) in FIRST_SENTENCE else ["\n"]
        limit = self.answer_room(lm, examples)
        outputs = lm.generate(texts, n=1, temperature=0.0, max_new_tokens=limit, stop=stop)
        # The reference continuation is " " + output, so the model's answer starts with a space.
        flat = [out[0].lstrip() for out in outputs]
        width = len(examples)
        return [flat[i : i + width] for i in range(0, len(flat), width)]

    def answer_room(self, lm: LanguageModel, examples: Sequence[Example]) -> int:
        """Tokens an answer may take: `max_new_tokens`, or less under em and es (see above)."""
        tokenizer = getattr(lm, "tokenizer", None)
        if (self.metric or DEFAULT_METRIC) not in WHOLE_ANSWER or tokenizer is None:
            return self.max_new_tokens
        answers = [" " + a for ex in examples for a in ex.answers]
        if not answers:
            return self.max_new_tokens
        longest = max(len(ids) for ids in tokenizer(answers, add_special_tokens=False)["input_ids"])
        return min(self.max_new_tokens, 2 * longest + 4)

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
