"""Log-likelihood of the reference output under each prompt (APE's selection criterion)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np

from ape.capabilities import LOGLIK_SCORES, TRAINING_LOSS, Loss
from ape.lm import LanguageModel
from ape.prompt import Prompt
from ape.task import Example, Task

Reduce = Literal["mean", "sum"]


class LoglikEvaluator:
    """log p(output | prompt, input), as a per-token mean (default) or summed over tokens.

    The mean keeps long outputs from being penalized for their length alone.
    """

    offers: ClassVar[frozenset[str]] = frozenset({LOGLIK_SCORES, TRAINING_LOSS})

    def __init__(self, reduce: Reduce = "mean") -> None:
        if reduce not in ("mean", "sum"):
            raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
        self.reduce = reduce
        self.name = "loglik" if reduce == "mean" else "loglik_sum"

    @classmethod
    def options_from_task(cls, task: Task) -> dict[str, Any]:
        """Nothing: the reference output is all it needs."""
        return {}

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

    def training_loss(self, lm, template: Prompt, examples: Sequence[Example]) -> Loss:
        """The reference output's negative log-likelihood per token after vectors placed before
        `template`'s text, averaged over the batch (per token for `sum` too: a long output
        should not outweigh a short one in a gradient step)."""
        import torch

        def loss(vectors: torch.Tensor, batch: Sequence[Example]) -> torch.Tensor:
            sums, counts = lm.loglikelihood_tensor(template.requests(batch), soft_prefix=vectors)
            return -(sums / torch.as_tensor(counts, device=sums.device)).mean()

        return loss


class LoglikSumEvaluator(LoglikEvaluator):
    """The summed log-prob of the reference output."""

    def __init__(self) -> None:
        super().__init__(reduce="sum")
