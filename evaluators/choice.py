"""Classification through label words: the prompt's prediction is its most likely label."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ape.capabilities import LABEL_LOGPROBS, TRAINING_LOSS, Loss
from ape.lm import LanguageModel
from ape.prompt import Prompt
from ape.task import Example, Task


@dataclass
class ChoiceEvaluator:
    """Accuracy of argmax over labels of log p(verbalizer word | prompt, input).

    `labels` default to the keys of a `verbalizers` mapping, else to the sorted distinct outputs
    of the examples scored. Pass the task's full label set when scoring a subset that may miss
    some labels. `verbalizers` give the word scored per label: a mapping (labels left out score
    as themselves) or a sequence aligned with the labels.
    """

    labels: Sequence[str] | None = None
    verbalizers: Mapping[str, str] | Sequence[str] | None = None
    name = "choice"  # not a field: unannotated
    offers: ClassVar[frozenset[str]] = frozenset({LABEL_LOGPROBS, TRAINING_LOSS})

    @classmethod
    def options_from_task(cls, task: Task) -> dict[str, Any]:
        """The task's labels (else its distinct outputs) and its verbalizers, if any."""
        options: dict[str, Any] = {"labels": task.labels or task.distinct_outputs()}
        if task.verbalizers:
            options["verbalizers"] = dict(task.verbalizers)
        return options

    def resolve_labels(self, examples: Sequence[Example]) -> list[str]:
        """The label order used on the last axis of `label_logprobs`."""
        if self.labels is not None:
            labels = list(self.labels)
        elif isinstance(self.verbalizers, Mapping):
            labels = list(self.verbalizers)
        else:
            labels = sorted({ex.output for ex in examples})
        if len(set(labels)) != len(labels):
            raise ValueError(f"duplicate labels in {labels}")
        return labels

    def _words(self, labels: list[str]) -> list[str]:
        verbalizers = self.verbalizers
        if verbalizers is None:
            return labels
        if isinstance(verbalizers, Mapping):
            unknown = sorted(set(verbalizers) - set(labels))
            if unknown:
                raise ValueError(f"verbalizers name labels not in {labels}: {unknown}")
            return [verbalizers.get(label, label) for label in labels]
        if isinstance(verbalizers, str) or len(verbalizers) != len(labels):
            raise ValueError(
                f"verbalizers must be a mapping or a sequence of {len(labels)} words "
                f"aligned with labels {labels}"
            )
        return list(verbalizers)

    def label_words(self, examples: Sequence[Example]) -> tuple[list[str], list[str]]:
        """The labels, in `label_logprobs` order, and the word scored for each."""
        labels = self.resolve_labels(examples)
        return labels, self._words(labels)

    def label_logprobs(
        self, lm: LanguageModel, prompts: Sequence[Prompt], examples: Sequence[Example]
    ) -> np.ndarray:
        """Summed log-prob of each label's word, shape (prompts, examples, labels)."""
        words = self._words(self.resolve_labels(examples))
        shape = (len(prompts), len(examples), len(words))
        if not all(shape):
            return np.zeros(shape)
        requests = [
            (prompt.context(ex.input), prompt.continuation(word))
            for prompt in prompts
            for ex in examples
            for word in words
        ]
        return np.asarray(lm.loglikelihood(requests), dtype=np.float64).reshape(shape)

    def score(
        self, lm: LanguageModel, prompts: Sequence[Prompt], examples: Sequence[Example]
    ) -> np.ndarray:
        labels = self.resolve_labels(examples)
        index = {label: i for i, label in enumerate(labels)}
        # Check every gold label before spending any model time.
        for ex in examples:
            if ex.output not in index:
                raise ValueError(
                    f"example output {ex.output!r} (input {ex.input!r}) is not one of the "
                    f"labels {labels}"
                )
        if not prompts or not examples:
            return np.zeros((len(prompts), len(examples)))
        gold = np.array([index[ex.output] for ex in examples])
        predicted = self.label_logprobs(lm, prompts, examples).argmax(axis=-1)  # first on ties
        return (predicted == gold[None, :]).astype(np.float64)

    def training_loss(self, lm, template: Prompt, examples: Sequence[Example]) -> Loss:
        """Cross-entropy over the label words after vectors placed before `template`'s text (each
        label's summed log-prob of its word is its logit): the smooth version of the accuracy
        `score` counts. `examples` fix the label set."""
        import torch

        labels, words = self.label_words(examples)
        index = {label: i for i, label in enumerate(labels)}

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
