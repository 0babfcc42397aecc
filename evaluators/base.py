"""The evaluator interface and lookup by name through the ``ape.evaluators`` entry points.

An evaluator scores every candidate prompt on every example; higher is better. Third-party
packages add evaluators by declaring an entry point in that group.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import EntryPoint, entry_points
from typing import Protocol, runtime_checkable

import numpy as np

from ape.lm import LanguageModel
from ape.prompt import Prompt
from ape.task import Example

ENTRY_POINT_GROUP = "ape.evaluators"


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


def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_evaluators() -> list[str]:
    """Names accepted by `get_evaluator`, sorted."""
    return sorted(_entry_points())


def get_evaluator(name: str, **options: object) -> Evaluator:
    """The evaluator registered as `name`, constructed with `options`."""
    points = _entry_points()
    if name not in points:
        raise ValueError(f"unknown evaluator {name!r}; choose one of: {', '.join(sorted(points))}")
    return points[name].load()(**options)
