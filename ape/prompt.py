"""A prompt and the one template that turns (prompt, example input) into model text.

Every evaluator and searcher renders through `Prompt.context` / `Prompt.continuation`, so the text
a prompt is scored on is exactly the text `Result.best.render(input)` gives back to the user.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from ape.task import Example


@dataclass(frozen=True)
class Prompt:
    """An instruction plus optional few-shot demonstrations."""

    instruction: str = ""
    demos: tuple[Example, ...] = ()

    def key(self) -> str:
        """The prompt's identity: equal keys render identical text for every input."""
        demos = [[d.input, d.output] for d in self.demos]
        return json.dumps([self.instruction, demos], ensure_ascii=False)

    def context(self, input: str) -> str:
        """The text the model sees before its answer."""
        parts = [f"Instruction: {self.instruction.strip()}"] if self.instruction.strip() else []
        parts += [f"Input: {d.input}\nOutput: {d.output}" for d in self.demos]
        parts.append(f"Input: {input}\nOutput:")
        return "\n\n".join(parts)

    @staticmethod
    def continuation(output: str) -> str:
        """The answer as it follows the context (one space after 'Output:')."""
        return f" {output}"

    def render(self, input: str) -> str:
        """The exact text to send to the model for `input`."""
        return self.context(input)

    def requests(self, examples: Sequence[Example]) -> list[tuple[str, str]]:
        """(context, reference continuation) pairs for log-likelihood scoring."""
        return [(self.context(ex.input), self.continuation(ex.output)) for ex in examples]
