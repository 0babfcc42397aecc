"""Grouped-query attention without the per-head KV copy (ape/gqa_attention.py) against
transformers' own "sdpa" attention."""

from __future__ import annotations

import copy

import torch
import transformers
from conftest import tiny_llama_config

from ape.gqa_attention import NAME, use_gqa_attention
from ape.lm import HFLanguageModel

DEMOS = "".join(f"Input: {a}\nOutput: {b}\n\n" for a, b in [("hot", "cold"), ("up", "down")])
REQUESTS = [
    (f"Write the opposite.\n\n{DEMOS}Input: {w}\nOutput:", f" {o}")
    for w, o in [("big", "small"), ("wet", "dry"), ("on", "off"), ("early", "late")]
] + [("The capital of France is", " Paris"), ("", " hello world")]


def test_scores_and_greedy_texts_are_those_of_sdpa(tiny_lm, monkeypatch):
    assert tiny_lm.model.config.get_text_config().num_key_value_heads < 4  # grouped heads
    plain = copy.deepcopy(tiny_lm.model)
    plain.set_attn_implementation("sdpa")
    reference = HFLanguageModel(plain, tiny_lm.tokenizer, name="plain")
    broadcast = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        broadcast.append(kwargs.get("enable_gqa", False))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    ours = tiny_lm.loglikelihood(REQUESTS)
    assert any(broadcast), "the masked passes broadcast the key/value heads"
    theirs = reference.loglikelihood(REQUESTS)
    assert abs(ours - theirs).max() < 1e-5
    prompts = [context for context, _ in REQUESTS[:5]]
    assert tiny_lm.generate(prompts, max_new_tokens=6) == reference.generate(
        prompts, max_new_tokens=6
    )


def test_only_grouped_sdpa_models_are_switched(tokenizer):
    config = tiny_llama_config(tokenizer, num_hidden_layers=1, num_key_value_heads=4)
    ungrouped = transformers.LlamaForCausalLM(config).eval()
    assert not use_gqa_attention(ungrouped)
    config.num_key_value_heads = 2
    grouped = transformers.LlamaForCausalLM(config).eval()
    assert use_gqa_attention(grouped)
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    switched = grouped(input_ids=ids, attention_mask=mask).logits
    grouped.set_attn_implementation("sdpa")
    assert torch.allclose(switched, grouped(input_ids=ids, attention_mask=mask).logits, atol=1e-6)
    assert NAME != "sdpa"
