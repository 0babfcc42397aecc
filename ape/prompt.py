"""A prompt and the one template that turns (prompt, example input) into model text.

Every evaluator and searcher renders through `Prompt.context` / `Prompt.continuation`, so the text
a prompt is scored on is exactly the text `Result.best.render(input)` gives back to the user.

A prompt may carry a `VectorPrefix`: trained vectors that go before its text (a soft prompt). Its
instruction is then the prefix's label (``<soft prompt: 8 vectors 1a2b3c4d>``, naming the
vectors on the leaderboard and in the trial store) and its text is the no-instruction template.
Scoring after the vectors is ape/prefix.py; where vectors come from is search/soft/.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ape.task import Example

if TYPE_CHECKING:
    import torch

# The label names the vectors wherever only text is kept (trials, result files, the CLI).
LABEL_OPEN = "<soft prompt:"


@dataclass(frozen=True)
class VectorPrefix:
    """[n, d_model] vectors placed before a prompt's text, named by `label`.

    `vectors` is None for a prefix read back from text (a stored trial, a result file): it renders
    as the loaded one does, but scoring it needs the vectors. Equality is the label's: equal
    labels, equal vectors (a digest of their bytes).
    """

    label: str
    vectors: torch.Tensor | None = field(default=None, compare=False, repr=False)
    model: str = field(default="", compare=False)  # the model the vectors were made for

    @classmethod
    def of(cls, vectors: torch.Tensor, model: str = "") -> VectorPrefix:
        """A prefix holding a float32 CPU copy of `vectors` (the caller's tensor may be a
        parameter that training keeps updating in place), labelled by their digest."""
        import torch

        copy = vectors.detach().to("cpu", torch.float32, copy=True).contiguous()
        if copy.ndim != 2 or not copy.shape[0]:
            raise ValueError(f"a soft prompt is [n > 0, d_model], got {tuple(copy.shape)}")
        return cls(f"{LABEL_OPEN} {copy.shape[0]} vectors {digest(copy)}>", copy, model)

    @classmethod
    def named(cls, text: str) -> VectorPrefix | None:
        """The (unloaded) prefix that `text` is the label of, or None for ordinary text."""
        return cls(text) if text.startswith(LABEL_OPEN) and text.endswith(">") else None

    @property
    def loaded(self) -> bool:
        return self.vectors is not None


def digest(vectors: torch.Tensor) -> str:
    """8 hex digits of float32 CPU `vectors`' bytes: equal digests, equal vectors (for all
    practical purposes), so a stored trial is replayed only for the very same vectors."""
    return hashlib.sha1(vectors.numpy().tobytes()).hexdigest()[:8]


@dataclass(frozen=True)
class Prompt:
    """An instruction plus optional few-shot demonstrations, optionally after vectors."""

    instruction: str = ""
    demos: tuple[Example, ...] = ()
    # Left out of equality and repr: with a prefix, the instruction is its label.
    prefix: VectorPrefix | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.prefix is not None and self.instruction != self.prefix.label:
            raise ValueError(
                f"a prompt with a vector prefix is named by its label {self.prefix.label!r}, "
                f"not {self.instruction!r}"
            )

    @classmethod
    def prefixed(cls, prefix: VectorPrefix, demos: Sequence[Example] = ()) -> Prompt:
        """The prompt that scores `prefix`'s vectors before the (no-instruction) template."""
        return cls(prefix.label, tuple(demos), prefix)

    @classmethod
    def from_text(cls, instruction: str, demos: Sequence[Example] = ()) -> Prompt:
        """A prompt that was kept as text (a stored trial, a result file, the command line): a
        vector prefix's label comes back as that prefix, without its vectors."""
        return cls(instruction, tuple(demos), VectorPrefix.named(instruction))

    def key(self) -> str:
        """The prompt's identity: equal keys render identical text for every input."""
        demos = [[d.input, d.output] for d in self.demos]
        return json.dumps([self.instruction, demos], ensure_ascii=False)

    def context(self, input: str) -> str:
        """The text the model sees before its answer (after the vectors of a prefix)."""
        text = "" if self.prefix is not None else self.instruction.strip()
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
