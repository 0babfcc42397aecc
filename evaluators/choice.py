"""Classification through label words: the prompt's prediction is its most likely label."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from ape.evaluators.calibration import CONTENT_FREE, calibrated

from ape.capabilities import LABEL_LOGPROBS, TRAINING_LOSS, Loss
from ape.lm import LanguageModel
from ape.prompt import Prompt
from ape.task import Example, Task

CALIBRATE_HELP = (
    "contextual calibration (Zhao et al. 2021): subtract each label word's mean log-prob after "
    "content-free inputs ('N/A', '', '[MASK]') from its log-prob, so the prompt's bias toward "
    "a label no longer decides"
)


@dataclass
class ChoiceEvaluator:
    """Accuracy of argmax over labels of log p(verbalizer word | prompt, input).

    `labels` default to the keys of a `verbalizers` mapping, else to the sorted distinct outputs
    of the examples scored. Pass the task's full label set when scoring a subset that may miss
    some labels. `verbalizers` give the word scored per label: a mapping (labels left out score
    as themselves) or a sequence aligned with the labels. A prompt's own `label_words` take
    precedence over them. With `calibrate`, label scores are contextually calibrated (see
    evaluators/calibration.py).
    """

    labels: Sequence[str] | None = None
    verbalizers: Mapping[str, str] | Sequence[str] | None = None
    # An option of its own (help text): a CLI flag --calibrate and an optimize() keyword.
    calibrate: bool = field(default=False, metadata={"help": CALIBRATE_HELP})
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
        """The labels, in `label_logprobs` order, and the evaluator's own word for each."""
        labels = self.resolve_labels(examples)
        return labels, self._words(labels)

    def prompt_words(self, prompt: Prompt, labels: list[str]) -> list[str]:
        """The word scored per label for `prompt`: its own label words, else the evaluator's."""
        own = prompt.words
        unknown = sorted(set(own) - set(labels))
        if unknown:
            raise ValueError(f"the prompt's label words name labels not in {labels}: {unknown}")
        given = self._words(labels)
        return [own.get(label, word) for label, word in zip(labels, given, strict=True)]

    def label_logprobs(
        self, lm: LanguageModel, prompts: Sequence[Prompt], examples: Sequence[Example]
    ) -> np.ndarray:
        """Summed log-prob of each label's word, shape (prompts, examples, labels); with
        `calibrate`, minus each word's content-free bias (a log-ratio, which may exceed 0)."""
        labels = self.resolve_labels(examples)
        shape = (len(prompts), len(examples), len(labels))
        if not all(shape):
            return np.zeros(shape)
        words = [self.prompt_words(prompt, labels) for prompt in prompts]
        inputs = [ex.input for ex in examples] + list(CONTENT_FREE if self.calibrate else ())
        # One call for the grid and the content-free rows: the model batches them together.
        requests = [
            (prompt.context(text), prompt.continuation(word))
            for prompt, scored in zip(prompts, words, strict=True)
            for text in inputs
            for word in scored
        ]
        grid = np.asarray(lm.loglikelihood(requests), dtype=np.float64)
        grid = grid.reshape(len(prompts), len(inputs), len(labels))
        if not self.calibrate:
            return grid
        return calibrated(grid[:, : len(examples)], grid[:, len(examples) :])

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
        `score` counts. `examples` fix the label set; `template`'s label words are used where it
        has them. Not calibrated: the bias after trained vectors moves with them."""
        import torch

        labels = self.resolve_labels(examples)
        words = self.prompt_words(template, labels)
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
