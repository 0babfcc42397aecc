"""Classification through label words: the prompt's prediction is its most likely label."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ape.lm import LanguageModel
from ape.prompt import Prompt
from ape.task import Example


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
