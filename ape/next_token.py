"""How a decoding row picks its next token: greedy, or an inverse-CDF draw at a seeded uniform.

Sampling is inverse-CDF: token t of sample j of prompt i is picked with a uniform drawn by numpy
from the seed (seed, i, j), so a text depends on the seed, the prompt and its index, not on the
batching (up to float rounding of the logits), and the global RNG is never touched.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def uniforms(rows: Sequence[tuple[int, int, int]], count: int) -> np.ndarray:
    """[rows, count] uniforms in [0, 1), row (seed, i, j) drawn from the seed (seed, i, j)."""
    # numpy seeds are non-negative
    return np.stack(
        [np.random.default_rng([seed % 2**64, i, j]).random(count) for seed, i, j in rows]
    )


def choose(
    logits: torch.Tensor, u: torch.Tensor | None, temperature: float, top_p: float, head: int = 256
) -> torch.Tensor:
    """The next token per row: argmax when greedy, else the inverse-CDF draw at uniform `u`.

    The distribution is that of `model.generate`'s sampling: softmax(logits / temperature),
    restricted to the nucleus (the most likely tokens before which less than `top_p` mass lies,
    at least one) and renormalized. Sorting the vocabulary costs as much as a model step on a
    CPU, so only the `head` most likely tokens are sorted, unless they hold less than `top_p`.
    """
    if temperature <= 0 or u is None:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    u = u.to(probs.device, probs.dtype)
    if top_p >= 1.0:  # no nucleus: the vocabulary's own order will do
        return draw(probs, None, u)
    sorted_p, order = probs.topk(min(head, probs.shape[-1]), dim=-1)
    tokens = draw(nucleus_mask(sorted_p, top_p), order, u)
    short = sorted_p.sum(-1) < top_p  # a flat row: its nucleus reaches past the head
    if bool(short.any()):
        sorted_p, order = probs[short].sort(dim=-1, descending=True)
        tokens[short] = draw(nucleus_mask(sorted_p, top_p), order, u[short])
    return tokens


def draw(probs: torch.Tensor, order: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
    """Per row, the token at which the cumulative mass of `probs` first exceeds `u` of it."""
    cum = probs.cumsum(-1)
    k = torch.searchsorted(cum, u[:, None] * cum[:, -1:], right=True)
    # A target rounded up to the total would land past the end: take the last possible token.
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1, keepdim=True)
    k = torch.minimum(k, last)
    return (k if order is None else order.gather(-1, k)).squeeze(-1)


def nucleus_mask(sorted_p: torch.Tensor, top_p: float) -> torch.Tensor:
    """`sorted_p` (descending per row) with the tokens outside the nucleus set to zero."""
    keep = (sorted_p.cumsum(-1) - sorted_p) < top_p
    keep[:, 0] = True
    return sorted_p * keep
