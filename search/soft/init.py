"""Where a soft prompt's vectors start: a text's embeddings, frequent tokens, or noise."""

from __future__ import annotations

import torch

INITS = ("text", "vocab", "random")
# BPE vocabularies are built merge by merge, most frequent pairs first, so low ids are roughly the
# frequent tokens. With no corpus at hand this stands in for "the 5,000 most frequent tokens".
FREQUENT_TOKENS = 5000


def embedding_table(lm) -> torch.Tensor:
    """The model's input embeddings, [vocab, d_model], float32 on CPU, detached."""
    return lm.model.get_input_embeddings().weight.detach().float().cpu()


def text_tokens(lm, text: str, n: int) -> list[int]:
    """`text`'s tokens, tiled (repeated) or trimmed (first n kept) to exactly n."""
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"init text {text!r} has no tokens")
    return (ids * (n // len(ids) + 1))[:n]


def frequent_tokens(lm, n: int, generator: torch.Generator) -> list[int]:
    """n ids drawn uniformly (with replacement) from the FREQUENT_TOKENS lowest non-special ids."""
    special = set(lm.tokenizer.all_special_ids)
    pool = [i for i in range(len(lm.tokenizer)) if i not in special][:FREQUENT_TOKENS]
    picks = torch.randint(len(pool), (n,), generator=generator)
    return [pool[i] for i in picks.tolist()]


def initial_vectors(
    lm, how: str, n: int, text: str, generator: torch.Generator
) -> tuple[torch.Tensor, list[int]]:
    """[n, d_model] starting vectors and the token ids they are (empty for 'random')."""
    table = embedding_table(lm)
    if how == "text":
        ids = text_tokens(lm, text, n)
    elif how == "vocab":
        ids = frequent_tokens(lm, n, generator)
    elif how == "random":
        # Per-dimension mean and spread of the embedding table, so the vectors start at its scale.
        noise = torch.randn(n, table.shape[1], generator=generator)
        return table.mean(0) + noise * table.std(0), []
    else:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {how!r}")
    return table[ids].clone(), ids
