"""Where a soft prompt's vectors start: a text's embeddings, frequent tokens, or noise.

A text starts as the tokens the template puts before its input ("Instruction: TEXT" and the
blank line, tokenized as in context), so untrained vectors score exactly as the text prompt.
A key/value prefix starts as the model's own keys and values for those vectors.
"""

from __future__ import annotations

import torch

import ape.kv_cache as kv_cache
from ape.prompt import Prompt

INITS = ("text", "vocab", "random")
# BPE vocabularies are built merge by merge, most frequent pairs first, so low ids are roughly the
# frequent tokens. With no corpus at hand this stands in for "the 5,000 most frequent tokens".
FREQUENT_TOKENS = 5000
# Virtual tokens for the starts that have no length of their own (frequent tokens, noise).
DEFAULT_TOKENS = 16


def embedding_table(lm) -> torch.Tensor:
    """The model's input embeddings, [vocab, d_model], float32 on CPU, detached."""
    return lm.model.get_input_embeddings().weight.detach().float().cpu()


def instruction_tokens(lm, text: str) -> list[int]:
    """The tokens `Prompt(text)` renders before the no-instruction template, as tokenized in
    context: vectors made of them, then the template, are the text prompt token for token."""
    tokens = lm.tokenizer
    whole = tokens(Prompt(text).context("x"), add_special_tokens=False)["input_ids"]
    tail = tokens(Prompt("").context("x"), add_special_tokens=False)["input_ids"]
    if not text.strip() or whole[len(whole) - len(tail) :] != tail:
        raise ValueError(f"init text {text!r} does not render as tokens before the template")
    return whole[: len(whole) - len(tail)]


def text_tokens(lm, text: str, n: int) -> list[int]:
    """`text`'s instruction tokens (`instruction_tokens`), all of them for n = 0, else tiled
    (repeated) or trimmed (first n kept) to exactly n."""
    ids = instruction_tokens(lm, text)
    return ids if n == 0 else (ids * (n // len(ids) + 1))[:n]


def frequent_tokens(lm, n: int, generator: torch.Generator) -> list[int]:
    """n ids drawn uniformly (with replacement) from the FREQUENT_TOKENS lowest non-special ids."""
    special = set(lm.tokenizer.all_special_ids)
    pool = [i for i in range(len(lm.tokenizer)) if i not in special][:FREQUENT_TOKENS]
    picks = torch.randint(len(pool), (n,), generator=generator)
    return [pool[i] for i in picks.tolist()]


def initial_vectors(
    lm, how: str, n: int, text: str, generator: torch.Generator
) -> tuple[torch.Tensor, list[int]]:
    """[n, d_model] starting vectors and the token ids they are (empty for 'random').

    n = 0: the text's own length for 'text', DEFAULT_TOKENS otherwise."""
    table = embedding_table(lm)
    if how == "text":
        ids = text_tokens(lm, text, n)
    elif how == "vocab":
        ids = frequent_tokens(lm, n or DEFAULT_TOKENS, generator)
    elif how == "random":
        # Per-dimension mean and spread of the embedding table, so the vectors start at its scale.
        noise = torch.randn(n or DEFAULT_TOKENS, table.shape[1], generator=generator)
        return table.mean(0) + noise * table.std(0), []
    else:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {how!r}")
    return table[ids].clone(), ids


@torch.no_grad()
def initial_kv(lm, vectors: torch.Tensor) -> torch.Tensor:
    """The model's keys and values for input embeddings `vectors` at positions 0..n-1:
    [layers, 2, kv_heads, n, head_dim], float32 on CPU. Scored before a text, they give what
    the vectors give (the text's positions start at n either way)."""
    return torch.stack([torch.stack(kv) for kv in _states(lm, vectors)]).float().cpu()


def _states(lm, vectors: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    embeds = vectors.to(lm.device, lm.model.dtype)[None]
    positions = torch.arange(embeds.shape[1], device=lm.device)[None]
    _, cache = kv_cache.run(
        lm.model.base_model, inputs_embeds=embeds, position_ids=positions, use_cache=True
    )
    return [(k[0], v[0]) for k, v in kv_cache.layer_states(cache)]
