"""The plain reference scorer: one unbatched forward pass per request.

Slow on purpose. Tests and benchmarks hold the fast scorer in `ape.lm` against it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ape.lm import HFLanguageModel, Request


@torch.inference_mode()
def reference_loglikelihood(lm: HFLanguageModel, requests: Sequence[Request]) -> np.ndarray:
    """Summed log-prob of each continuation, from a full forward pass over context+continuation."""
    out = np.zeros(len(requests))
    for i, (context, continuation) in enumerate(lm.encode_pairs(requests)):
        ids = torch.tensor([context + continuation], device=lm.device)
        logits = lm.model(input_ids=ids).logits[0].float()  # [seq, vocab]
        logprobs = logits[len(context) - 1 : -1].log_softmax(-1)
        targets = torch.tensor(continuation, device=lm.device)
        out[i] = logprobs[torch.arange(len(continuation)), targets].sum().item()
    return out
