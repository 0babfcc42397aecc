"""Scoring prompts that carry a vector prefix: each goes to the model after its vectors.

`PrefixedModel` hands the vectors (input embeddings, or per-layer keys and values) to
`HFLanguageModel.loglikelihood(soft_prefix=...)`, so they take the exact, prefix-reusing path of
text prompts. `score_prompts` is `evaluator.score` for a mix of plain and prefixed prompts: the
plain ones in one call, each prefix in a call of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ape.kv_cache import kv_shape
from ape.prompt import Prompt, VectorPrefix
from ape.task import Example


def check_fits(prefix: VectorPrefix, lm: Any) -> None:
    """Refuse vectors made for another model, in one line: embeddings must have the model's
    width; a key/value prefix its layers, KV heads and head size (ape.kv_cache.kv_shape)."""
    if prefix.vectors is None:
        return
    made_for = f"made for model {prefix.model!r}" if prefix.model else "made for another model"
    if prefix.kind == "embeddings":
        width = lm.model.get_input_embeddings().weight.shape[1]
        if prefix.vectors.shape[1] != width:
            raise ValueError(
                f"the soft prompt has {prefix.vectors.shape[1]}-dim vectors ({made_for}); "
                f"model {lm.name!r} takes {width}"
            )
        return
    layers, heads, dim = kv_shape(lm.model)  # raises for a cache layout it cannot take
    got = tuple(prefix.vectors.shape)
    if (got[0], got[2], got[4]) != (layers, heads, dim):
        raise ValueError(
            f"the key/value prefix has {got[0]} layers x {got[2]} KV heads x {got[4]} dims "
            f"({made_for}); model {lm.name!r} has {layers} x {heads} x {dim}"
        )


class PrefixedModel:
    """A view of `lm` whose every request starts with `prefix`'s vectors."""

    def __init__(self, lm: Any, prefix: VectorPrefix):
        check_fits(prefix, lm)
        self.lm = lm
        self.prefix = prefix
        self.name = lm.name
        self.tokenizer = getattr(lm, "tokenizer", None)

    def loglikelihood(self, requests, *, return_counts: bool = False):
        return self.lm.loglikelihood(
            requests, return_counts=return_counts, soft_prefix=self.prefix.vectors
        )

    def generate(self, prompts, **kwargs):
        raise ValueError(
            "generation after a soft prompt is not supported; score it with the loglik or "
            "choice evaluator"
        )


def model_for(lm: Any, prompt: Prompt) -> Any:
    """The model that scores `prompt`: `lm` itself, or a view with its prefix in front."""
    if prompt.prefix is None:
        return lm
    if not prompt.prefix.loaded:
        raise ValueError(
            f"prompt {prompt.instruction!r} names a soft prompt whose vectors are not loaded; "
            "load them with ape.search.soft.SoftPrompt.load(result.file('soft_prompt', path))"
        )
    return PrefixedModel(lm, prompt.prefix)


def score_prompts(
    evaluator: Any, lm: Any, prompts: Sequence[Prompt], examples: Sequence[Example]
) -> np.ndarray:
    """`evaluator.score(lm, prompts, examples)`, each prefixed prompt scored after its vectors."""
    return by_prefix(evaluator.score, lm, prompts, examples)


def by_prefix(
    method: Callable[[Any, Sequence[Prompt], Sequence[Example]], np.ndarray],
    lm: Any,
    prompts: Sequence[Prompt],
    examples: Sequence[Example],
) -> np.ndarray:
    """`method(lm, prompts, examples)` (an evaluator's `score` or `label_logprobs`: one row per
    prompt), each prefixed prompt after its vectors. Plain prompts go to the model in one call
    as before; each prefix in its own call."""
    for prompt in prompts:
        model_for(lm, prompt)  # a label without its vectors fails before any scoring
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt.prefix.label if prompt.prefix else "", []).append(i)
    if set(groups) <= {""}:
        return method(lm, prompts, examples)
    grid = None
    for members in groups.values():
        chosen = [prompts[i] for i in members]
        rows = np.asarray(method(model_for(lm, chosen[0]), chosen, examples))
        if grid is None:  # its shape is the method's: (prompts, examples[, labels])
            grid = np.zeros((len(prompts), *rows.shape[1:]), dtype=rows.dtype)
        grid[members] = rows
    return grid
