"""Attention that reads each key/value head once for all its query heads, on a CPU.

In a grouped-query model (SmolLM2: 9 query heads share 3 key/value heads) transformers' "sdpa"
attention copies every key/value head once per query head it serves whenever a mask is given
(CUDA kernels would otherwise fall back to a slow path), and ape always gives one: packed
scoring, prefix caches and batched generation all need their own masks. On a CPU, torch's
scaled_dot_product_attention broadcasts the heads itself (`enable_gqa`), so that copy of the
whole KV per layer per pass is pure cost: a few-shot prompt's prefill spends a third of its
attention time on it. The result is the same sum over the same products.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "ape_gqa_sdpa"


def gqa_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, with the key/value heads broadcast, not copied, under a
    mask on a CPU (query [batch, heads, q, dim], key and value [batch, kv_heads, k, dim])."""
    groups = getattr(module, "num_key_value_groups", 1)
    plain = (
        groups == 1
        or attention_mask is None
        or query.device.type != "cpu"
        or query.shape[2] == 1  # transformers folds one query's heads into a row: no copy
        or kwargs.get("position_bias") is not None
        or kwargs.get("softcap") is not None
    )
    if plain:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask[:, :, :, : key.shape[2]],
        dropout_p=dropout,
        scale=scaling,
        enable_gqa=True,
    )
    return out.transpose(1, 2).contiguous(), None


def use_gqa_attention(model: torch.nn.Module) -> bool:
    """Switch `model` to `gqa_sdpa_forward` where its heads are grouped and its default
    attention is "sdpa"; returns whether it was switched. Masks are built as for "sdpa"."""
    config = model.config.get_text_config()
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if not heads or kv_heads >= heads:
        return False
    try:
        default = model.get_correct_attn_implementation(None)
    except (ValueError, ImportError):  # the architecture has no sdpa attention: left as it is
        return False
    if default != "sdpa":
        return False
    AttentionInterface.register(NAME, gqa_sdpa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return True
