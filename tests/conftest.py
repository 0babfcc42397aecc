"""Shared fixtures: the embedded model's real tokenizer and a tiny random Llama built on it."""

from __future__ import annotations

import pytest
import torch
import transformers

from ape.lm import HFLanguageModel
from ape.models import _local_directory


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer, from the converted cache (built once, ~30 s, if missing)."""
    directory = _local_directory("smollm2-135m")
    return transformers.AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="session")
def tiny_lm(tokenizer) -> HFLanguageModel:
    """A 2-layer random Llama: real tokenization and scoring paths, milliseconds per call."""
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    return HFLanguageModel(model, tokenizer, name="tiny")
