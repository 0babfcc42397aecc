"""The vocabulary head: hidden states to fp32 logits, and the log-probs of chosen tokens.

Scoring projects its positions a chunk at a time: 128 positions' logits are about 25 MB for a
50k vocabulary, where a batch's 800 take 160 MB, so the log-softmax reads them from cache
instead of memory (measured on a 2-core Xeon, 815 positions of SmolLM2: head + log-softmax
228 ms in one piece, 184 ms in chunks of 128, 223 ms in chunks of 64).
"""

from __future__ import annotations

import torch

HEAD_ROWS = 128


def logits_of(model, hidden: torch.Tensor) -> torch.Tensor:
    """Hidden states to fp32 vocabulary logits, as the model's own head would (softcap too)."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def read_logprobs(
    model, hidden: torch.Tensor, which: torch.Tensor, targets: torch.Tensor, pick: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For each read r: the fp32 log-prob of token `targets[r]` after position `which[r]` of
    `hidden` [positions, d_model], and (when `pick`) the argmax token there.

    The same numbers as one log-softmax over all positions; HEAD_ROWS positions at a time.
    """
    order, logprobs, picks = [], [], []
    for start in range(0, hidden.shape[0], HEAD_ROWS):
        chunk = logits_of(model, hidden[start : start + HEAD_ROWS]).log_softmax(-1)
        mine = ((which >= start) & (which < start + HEAD_ROWS)).nonzero()[:, 0]
        at = which[mine] - start
        order.append(mine)
        logprobs.append(chunk[at, targets[mine]])
        if pick:
            picks.append(chunk.argmax(-1)[at])
    back = torch.argsort(torch.cat(order))  # the reads were gathered chunk by chunk
    picked = torch.cat(picks)[back] if pick else None
    return torch.cat(logprobs)[back], picked
