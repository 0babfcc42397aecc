"""The training loss of a soft prompt, through the same scorer its checkpoints are judged by.

- With the `choice` evaluator: cross-entropy over the label words (each label's summed
  log-prob of its word is its logit), the smooth version of the accuracy the evaluator counts.
- Otherwise: the negative log-likelihood of the reference output, per token (as `loglik`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ape.prompt import Prompt
from ape.task import Example

Loss = Callable[[torch.Tensor, Sequence[Example]], torch.Tensor]


def make_loss(evaluator, lm, template: Prompt, examples: Sequence[Example]) -> Loss:
    """loss(vectors, batch): a scalar tensor whose gradient reaches `vectors`.

    `template` is the text after the vectors (its context and continuation, as scored);
    `examples` fix the label set of a choice evaluator.
    """
    if hasattr(evaluator, "label_words"):
        labels, words = evaluator.label_words(examples)
        index = {label: i for i, label in enumerate(labels)}
        return _choice_loss(lm, template, index, words)
    return _nll_loss(lm, template)


def _choice_loss(lm, template: Prompt, index: dict[str, int], words: list[str]) -> Loss:
    def loss(vectors: torch.Tensor, batch: Sequence[Example]) -> torch.Tensor:
        requests = [
            (template.context(ex.input), template.continuation(word))
            for ex in batch
            for word in words
        ]
        sums, _ = lm.loglikelihood_tensor(requests, soft_prefix=vectors)
        logits = sums.view(len(batch), len(words))
        gold = torch.tensor([index[ex.output] for ex in batch], device=logits.device)
        return torch.nn.functional.cross_entropy(logits, gold)

    return loss


def _nll_loss(lm, template: Prompt) -> Loss:
    def loss(vectors: torch.Tensor, batch: Sequence[Example]) -> torch.Tensor:
        sums, counts = lm.loglikelihood_tensor(template.requests(batch), soft_prefix=vectors)
        return -(sums / torch.as_tensor(counts, device=sums.device)).mean()

    return loss
