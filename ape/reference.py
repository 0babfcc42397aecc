"""The plain reference scorer: one unbatched forward pass per request.

Slow on purpose. Tests and benchmarks hold the fast scorer in `ape.lm` against it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ape.lm import HFLanguageModel, Request


@torch.inference_mode()
def reference_loglikelihood(
    lm: HFLanguageModel, requests: Sequence[Request], soft_prefix: torch.Tensor | None = None
) -> np.ndarray:
    """Summed log-prob of each continuation, from a full forward pass over context+continuation.

    With `soft_prefix` ([n, d_model]), the pass runs on inputs_embeds = [soft; token embeddings].
    """
    out = np.zeros(len(requests))
    embed = lm.model.get_input_embeddings()
    for i, (context, continuation) in enumerate(lm.encode_pairs(requests)):
        ids = torch.tensor([context + continuation], device=lm.device)
        if soft_prefix is None:
            logits = lm.model(input_ids=ids).logits[0].float()  # [seq, vocab]
        else:
            soft = soft_prefix.to(lm.device, lm.model.dtype)[None]
            embeds = torch.cat([soft, embed(ids)], dim=1)
            logits = lm.model(inputs_embeds=embeds).logits[0, soft.shape[1] :].float()
        logprobs = logits[len(context) - 1 : -1].log_softmax(-1)
        targets = torch.tensor(continuation, device=lm.device)
        out[i] = logprobs[torch.arange(len(continuation)), targets].sum().item()
    return out
