"""A prompt and the one template that turns (prompt, example input) into model text.

Every evaluator and searcher renders through `Prompt.context` / `Prompt.continuation`, so the text
a prompt is scored on is exactly the text `Result.best.render(input)` gives back to the user.

A soft prompt (ape/soft_prompt.py) is a prompt whose instruction is only a label such as
``<soft prompt: 8 vectors 1a2b3c4d>``: its trained vectors go before the text instead, and the text
is the no-instruction template.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ape.task import Example

if TYPE_CHECKING:
    from ape.soft_prompt import SoftPrompt

SOFT_LABEL = "<soft prompt:"


def is_soft_label(instruction: str) -> bool:
    """Whether `instruction` is a soft prompt's label rather than text for the model."""
    return instruction.startswith(SOFT_LABEL) and instruction.endswith(">")


@dataclass(frozen=True)
class Prompt:
    """An instruction plus optional few-shot demonstrations."""

    instruction: str = ""
    demos: tuple[Example, ...] = ()
    # A soft prompt's vectors, placed before the text; `instruction` is then their label. Left
    # out of equality and repr: the label names the vectors.
    soft: SoftPrompt | None = field(default=None, compare=False, repr=False)

    def key(self) -> str:
        """The prompt's identity: equal keys render identical text for every input."""
        demos = [[d.input, d.output] for d in self.demos]
        return json.dumps([self.instruction, demos], ensure_ascii=False)

    def context(self, input: str) -> str:
        """The text the model sees before its answer (after the vectors of a soft prompt)."""
        text = "" if is_soft_label(self.instruction) else self.instruction.strip()
        parts = [f"Instruction: {text}"] if text else []
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
