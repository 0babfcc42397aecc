"""The evaluator interface and lookup by name through the ``ape.evaluators`` entry points.

An evaluator scores every candidate prompt on every example; higher is better. Third-party
packages add evaluators by declaring an entry point in that group.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from ape.lm import LanguageModel
from ape.prompt import Prompt
from ape.registry import Registry
from ape.task import Example

ENTRY_POINT_GROUP = "ape.evaluators"
EVALUATORS = Registry(ENTRY_POINT_GROUP, "evaluator")


@runtime_checkable
class Evaluator(Protocol):
    """Scores a (prompts x examples) grid; row i is prompt i, column j is example j."""

    name: str

    def score(
        self, lm: LanguageModel, prompts: Sequence[Prompt], examples: Sequence[Example]
    ) -> np.ndarray:
        """Scores of shape (len(prompts), len(examples)), higher is better.

        Implementations send the whole grid to the model in one call, so the model can batch
        it and share the prompts' common prefixes.
        """
        ...


def available_evaluators() -> list[str]:
    """Names accepted by `get_evaluator`, sorted."""
    return EVALUATORS.names()


def get_evaluator(name: str, **options: object) -> Evaluator:
    """The evaluator registered as `name`, constructed with `options`."""
    return EVALUATORS.load(name)(**options)
