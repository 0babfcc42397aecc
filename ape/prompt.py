"""A prompt and the one template that turns (prompt, example input) into model text.

Every evaluator and searcher renders through `Prompt.context` / `Prompt.continuation`, so the text
a prompt is scored on is exactly the text `Result.best.render(input)` gives back to the user.

A prompt may carry a `VectorPrefix`: trained vectors that go before its text (a soft prompt),
input embeddings or per-layer keys and values (prefix tuning). Its instruction is then the
prefix's label (``<soft prompt: 8 vectors 1a2b3c4d>``, naming the vectors on the leaderboard and
in the trial store) and its text is the no-instruction template.
Scoring after the vectors is ape/prefix.py; where vectors come from is search/soft/.

A prompt may carry `label_words` (label -> word, for a classification task): the words the
`choice` evaluator scores as the answers, over its own verbalizers. Its demos keep their labels
and are shown with those words, so the demonstrations teach the very words that are scored.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from ape.task import Example

if TYPE_CHECKING:
    import torch

# The label names the vectors wherever only text is kept (trials, result files, the CLI).
LABEL_OPEN = "<soft prompt:"
# In a key/value prefix's label, after its count: what sets it apart from input embeddings.
KV_WORDS = "key/value vectors per layer"
# "embeddings": [n, d_model] vectors read before the text's tokens (prompt tuning, P-tuning, PEZ).
# "kv": [layers, 2, kv_heads, n, head_dim], per layer n keys (index 0) and values (index 1) that
# every token attends to, as to a prefix's KV cache (prefix tuning, P-tuning v2).
PrefixKind = Literal["embeddings", "kv"]


@dataclass(frozen=True)
class VectorPrefix:
    """Trained vectors placed before a prompt's text, named by `label`; see `PrefixKind`.

    `vectors` is None for a prefix read back from text (a stored trial, a result file): it renders
    as the loaded one does, but scoring it needs the vectors. Equality is the label's: equal
    labels, equal vectors (a digest of their bytes).
    """

    label: str
    vectors: torch.Tensor | None = field(default=None, compare=False, repr=False)
    model: str = field(default="", compare=False)  # the model the vectors were made for
    kind: PrefixKind = field(default="embeddings", compare=False)  # the label says it too

    @classmethod
    def of(cls, vectors: torch.Tensor, model: str = "") -> VectorPrefix:
        """A prefix holding a float32 CPU copy of `vectors` (the caller's tensor may be a
        parameter that training keeps updating in place), labelled by their digest; the shape
        says the kind: 2 dimensions are embeddings, 5 a key/value prefix."""
        import torch

        copy = vectors.detach().to("cpu", torch.float32, copy=True).contiguous()
        if copy.ndim == 2 and copy.shape[0]:
            return cls(f"{LABEL_OPEN} {copy.shape[0]} vectors {digest(copy)}>", copy, model)
        if copy.ndim == 5 and copy.shape[1] == 2 and copy.shape[3]:
            label = f"{LABEL_OPEN} {copy.shape[3]} {KV_WORDS} {digest(copy)}>"
            return cls(label, copy, model, "kv")
        raise ValueError(
            "a soft prompt is [n > 0, d_model] embeddings or [layers, 2, kv_heads, n > 0, "
            f"head_dim] keys and values, got {tuple(copy.shape)}"
        )

    @classmethod
    def named(cls, text: str) -> VectorPrefix | None:
        """The (unloaded) prefix that `text` is the label of, or None for ordinary text."""
        if not (text.startswith(LABEL_OPEN) and text.endswith(">")):
            return None
        return cls(text, kind="kv" if f" {KV_WORDS} " in text else "embeddings")

    @property
    def loaded(self) -> bool:
        return self.vectors is not None

    @property
    def n(self) -> int:
        """Virtual tokens: the positions the prefix takes before the text."""
        if self.vectors is None:
            raise ValueError(f"{self.label}: the vectors are not loaded")
        return int(self.vectors.shape[0 if self.kind == "embeddings" else 3])


def digest(vectors: torch.Tensor) -> str:
    """8 hex digits of float32 CPU `vectors`' bytes: equal digests, equal vectors (for all
    practical purposes), so a stored trial is replayed only for the very same vectors."""
    return hashlib.sha1(vectors.numpy().tobytes()).hexdigest()[:8]


@dataclass(frozen=True)
class Prompt:
    """An instruction plus optional few-shot demonstrations, optionally after vectors, and
    optionally with its own label words (label -> word pairs, kept sorted by label; a mapping
    given is turned into them)."""

    instruction: str = ""
    demos: tuple[Example, ...] = ()
    # Left out of equality and repr: with a prefix, the instruction is its label.
    prefix: VectorPrefix | None = field(default=None, compare=False, repr=False)
    label_words: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        # Canonical (sorted) pairs: equal mappings make equal prompts and keys.
        pairs = self.label_words
        pairs = pairs.items() if isinstance(pairs, Mapping) else pairs
        object.__setattr__(self, "label_words", tuple(sorted((str(k), str(v)) for k, v in pairs)))
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
    def from_text(
        cls,
        instruction: str,
        demos: Sequence[Example] = (),
        label_words: Mapping[str, str] | None = None,
    ) -> Prompt:
        """A prompt that was kept as text (a stored trial, a result file, the command line): a
        vector prefix's label comes back as that prefix, without its vectors."""
        prefix = VectorPrefix.named(instruction)
        return cls(instruction, tuple(demos), prefix, tuple((label_words or {}).items()))

    @property
    def words(self) -> dict[str, str]:
        """label -> word this prompt scores and shows (empty: the evaluator's own)."""
        return dict(self.label_words)

    def with_label_words(self, words: Mapping[str, str] | None) -> Prompt:
        """The same prompt with `words` as its label words (None or empty: none of its own)."""
        return replace(self, label_words=tuple((words or {}).items()))

    def key(self) -> str:
        """The prompt's identity: equal keys render identical text for every input."""
        demos = [[d.input, d.output] for d in self.demos]
        # Label words join the key only when present, so older stored keys stay valid.
        extra = [[list(pair) for pair in self.label_words]] if self.label_words else []
        return json.dumps([self.instruction, demos, *extra], ensure_ascii=False)

    def context(self, input: str) -> str:
        """The text the model sees before its answer (after the vectors of a prefix)."""
        text = "" if self.prefix is not None else self.instruction.strip()
        words = self.words
        parts = [f"Instruction: {text}"] if text else []
        parts += [f"Input: {d.input}\nOutput: {words.get(d.output, d.output)}" for d in self.demos]
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
