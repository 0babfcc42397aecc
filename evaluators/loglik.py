"""Log-likelihood of the reference output under each prompt (APE's selection criterion)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from ape.lm import LanguageModel
from ape.prompt import Prompt
from ape.task import Example

Reduce = Literal["mean", "sum"]


class LoglikEvaluator:
    """log p(output | prompt, input), as a per-token mean (default) or summed over tokens.

    The mean keeps long outputs from being penalized for their length alone.
    """

    def __init__(self, reduce: Reduce = "mean") -> None:
        if reduce not in ("mean", "sum"):
            raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
        self.reduce = reduce
        self.name = "loglik" if reduce == "mean" else "loglik_sum"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reduce={self.reduce!r})"

    def score(
        self, lm: LanguageModel, prompts: Sequence[Prompt], examples: Sequence[Example]
    ) -> np.ndarray:
        shape = (len(prompts), len(examples))
        if not prompts or not examples:
            return np.zeros(shape)
        requests = [req for prompt in prompts for req in prompt.requests(examples)]
        sums, counts = lm.loglikelihood(requests, return_counts=True)
        sums = np.asarray(sums, dtype=np.float64)
        if self.reduce == "mean":
            sums = sums / np.asarray(counts)
        return sums.reshape(shape)


class LoglikSumEvaluator(LoglikEvaluator):
    """The summed log-prob of the reference output."""

    def __init__(self) -> None:
        super().__init__(reduce="sum")
