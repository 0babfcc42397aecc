"""Baselines every searcher should beat: no instruction, the given ones, random demos.

Each scores its prompt(s) on the whole validation pool, the set every searcher's finalists are
judged on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ape.search.base import option, positive
from ape.search.demos import label_words, random_demos, shown

from ape.objective import Objective
from ape.prompt import Prompt


@dataclass(frozen=True)
class NoInstruction:
    """The bare input/output template with no instruction."""

    name: ClassVar[str] = "none"

    def search(self, objective: Objective) -> None:
        objective.evaluate([Prompt("")], objective.val_pool, origin="none")

    @classmethod
    def test_options(cls) -> dict[str, object]:
        """Options for the conformance tests: none to take."""
        return {}


@dataclass(frozen=True)
class GivenInstructions:
    """The user's own instructions, or the task's human-written ones."""

    name: ClassVar[str] = "given"

    instructions: tuple[str, ...] = option(
        (),
        "instructions to score (CLI: --instruction, repeatable); default: the task's human "
        "instructions from meta.json",
        flag="--instruction",
    )

    def search(self, objective: Objective) -> None:
        texts = list(self.instructions) or objective.task.human_instructions
        if not texts:
            raise ValueError(
                f"searcher 'given' needs instructions: pass --instruction TEXT, or give task "
                f"{objective.task.name!r} a meta.json with human_instructions"
            )
        objective.evaluate([Prompt(t) for t in texts], objective.val_pool, origin="given")

    @classmethod
    def test_options(cls) -> dict[str, object]:
        """Options for the conformance tests, whose task has no human instructions."""
        return {"instructions": ("Reverse the word.", "Spell the word backwards.")}


@dataclass(frozen=True)
class RandomDemos:
    """k random training examples as a few-shot prompt, with no instruction."""

    name: ClassVar[str] = "demos"

    k: int = option(5, "demonstrations drawn from the training split")

    def __post_init__(self) -> None:
        positive(k=self.k)

    def search(self, objective: Objective) -> None:
        demos = shown(
            random_demos(objective.task.train, self.k, objective.seed), label_words(objective)
        )
        objective.evaluate([Prompt("", demos)], objective.val_pool, origin=f"{self.k} random demos")

    @classmethod
    def test_options(cls) -> dict[str, object]:
        """Small options for the conformance tests."""
        return {"k": 2}
