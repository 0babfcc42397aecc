"""A toy searcher in a package of its own: this one file plus one entry point (``toy``, in
ape_toy_plugins-0.1.dist-info/entry_points.txt).

With this folder on sys.path, the conformance suites (tests/test_conformance_searchers.py) run
it like any registered searcher, with no edit anywhere else; a test there shows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ape.search.base import option, positive

from ape.capabilities import LABEL_LOGPROBS
from ape.objective import Objective
from ape.prompt import Prompt


@dataclass(frozen=True)
class ToySearcher:
    """Scores a few fixed instructions on a minibatch each, then the best on the whole pool."""

    name: ClassVar[str] = "toy"
    # A classifier's evaluator, which the default (loglik) is not: the suites must pick one that
    # offers it through ape.capabilities.
    needs: ClassVar[frozenset[str]] = frozenset({LABEL_LOGPROBS})

    instructions: tuple[str, ...] = option(
        ("Reverse the word.", "Spell the word backwards.", "Repeat the word."),
        "instructions to try (repeatable)",
        flag="--toy-instruction",
    )
    minibatch: int = option(5, "validation examples each instruction is first scored on")
    finalists: int = option(2, "best instructions scored on the whole validation pool")

    def __post_init__(self) -> None:
        positive(minibatch=self.minibatch, finalists=self.finalists)

    def search(self, objective: Objective) -> None:
        prompts = [Prompt(text) for text in self.instructions]
        scores = objective.evaluate(prompts, objective.val_order[: self.minibatch], origin="toy")
        means = scores.mean(axis=1)
        best = sorted(range(len(prompts)), key=lambda i: -means[i])[: self.finalists]
        objective.evaluate([prompts[i] for i in best], objective.val_pool)

    @classmethod
    def test_options(cls) -> dict[str, object]:
        """Small options for the conformance tests."""
        return {"minibatch": 3}
