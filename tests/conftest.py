"""Shared fixtures: the embedded model's real tokenizer and a tiny random Llama built on it."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from ape.search.ape import APESearcher

from ape.gqa_attention import use_gqa_attention
from ape.lm import HFLanguageModel
from ape.models import _local_directory


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer, from the converted cache (built once, ~30 s, if missing)."""
    directory = _local_directory("smollm2-135m")
    return transformers.AutoTokenizer.from_pretrained(directory)


def tiny_llama_config(tokenizer, **changes) -> transformers.LlamaConfig:
    """The tiny model's config (2 layers, 4 query heads in 2 groups), with `changes`."""
    shape = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return transformers.LlamaConfig(vocab_size=len(tokenizer), **{**shape, **changes})


@pytest.fixture(scope="session")
def tiny_lm(tokenizer) -> HFLanguageModel:
    """A 2-layer random Llama: real tokenization and scoring paths, milliseconds per call."""
    config = tiny_llama_config(tokenizer)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    use_gqa_attention(model)  # as load_model does on a CPU
    return HFLanguageModel(model, tokenizer, name="tiny")


# APE, small: two stages of bandit rounds over a handful of proposals, seconds on the tiny model.
SMALL_APE = APESearcher.test_options()


# Forty short words; the synthetic task maps each to its reverse.
WORDS = (
    "apple river stone cloud green table light music paper house water bread chair plant night "
    "dream smile ocean horse sugar glass train money heart earth tiger lemon piano candle forest "
    "silver garden window rocket button pencil castle butter letter island"
).split()


def write_task_file(path, words=WORDS):
    """A JSONL task (word -> reversed word) at `path`; returns the path."""
    path.write_text("".join(json.dumps({"input": w, "output": w[::-1]}) + "\n" for w in words))
    return path


@pytest.fixture(scope="session")
def task_file(tmp_path_factory):
    """A 40-row synthetic task file (15 train, 15 val, 10 test rows); tests only read it."""
    return write_task_file(tmp_path_factory.mktemp("task") / "words.jsonl")


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_lm, tmp_path_factory):
    """`tiny_lm` saved as a safetensors model directory, loadable with --model DIR."""
    directory = tmp_path_factory.mktemp("models") / "tiny-model"
    tiny_lm.model.save_pretrained(directory, safe_serialization=True)
    tiny_lm.tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def single_thread():
    """Run torch on one thread for the test: the tiny model gains nothing from more, and on a
    busy machine the threads' spin-waits make generation ten times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
