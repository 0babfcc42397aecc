"""The cross-call prefix cache: a prompt scored again reads its prefix's KV, exactly, in a cap."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_scoring_exact import TOL, assert_matches_reference

from ape.lm import HFLanguageModel
from ape.prefix_cache import ENV_MB, PrefixCache, default_bytes
from ape.scoring import PackedScorer

PROMPT = (
    "Instruction: Write the opposite of the input word.\n\nInput: hot\nOutput: cold\n\n"
    "Input: up\nOutput: down\n\nInput: {}\nOutput:"
)
FIRST = ["big", "fast", "light", "early", "happy"]
SECOND = ["open", "full", "rich", "young", "loud", "near"]
ANSWERS = {"big": " small", "fast": " slow", "light": " dark", "early": " late"}


def requests(words: list[str], prompt: str = PROMPT) -> list[tuple[str, str]]:
    return [(prompt.format(w), ANSWERS.get(w, " no")) for w in words]


@pytest.fixture
def lm(tiny_lm) -> HFLanguageModel:
    """The tiny model with a fresh cache of its own (the session's model keeps its scorer)."""
    return HFLanguageModel(tiny_lm.model, tiny_lm.tokenizer, name="tiny", prefix_cache_bytes=2**26)


@pytest.fixture
def prefix_runs(monkeypatch) -> list[int]:
    """Prefix tokens run by the scorer, per batch of prefixes."""
    runs: list[int] = []
    original = PackedScorer.prefix_batch

    def spy(self, batch, *args, **kwargs):
        runs.append(sum(len(p.rows[0].tokens) for p in batch))
        return original(self, batch, *args, **kwargs)

    monkeypatch.setattr(PackedScorer, "prefix_batch", spy)
    return runs


def test_a_prompt_scored_again_on_new_examples_reads_its_prefix(lm, prefix_runs):
    first = assert_matches_reference(lm, requests(FIRST))
    assert prefix_runs and len(lm.scorer.prefix_cache) == 1
    ran = sum(prefix_runs)
    prefix_runs.clear()
    assert_matches_reference(lm, requests(SECOND))
    assert prefix_runs == []  # nothing of the prompt ran again
    assert lm.scorer.prefix_cache.read_tokens >= ran - 2
    np.testing.assert_allclose(lm.loglikelihood(requests(FIRST)), first, rtol=0, atol=TOL)


def test_a_cleared_cache_runs_the_prompt_again(lm, prefix_runs):
    first = lm.loglikelihood(requests(FIRST))
    lm.clear_prefix_cache()
    assert len(lm.scorer.prefix_cache) == 0 and lm.scorer.prefix_cache.bytes == 0
    prefix_runs.clear()
    again = lm.loglikelihood(requests(FIRST))
    assert prefix_runs  # the prompt's prefix ran again
    np.testing.assert_allclose(again, first, rtol=0, atol=TOL)


def test_a_shorter_shared_start_serves_another_prompt(lm, prefix_runs):
    """Only the common start of a cached key is read; the rest of the new prompt runs."""
    lm.loglikelihood(requests(FIRST))
    prefix_runs.clear()
    other = PROMPT.replace("Input: up\nOutput: down", "Input: in\nOutput: out")
    assert_matches_reference(lm, requests(SECOND, other))
    assert prefix_runs == []  # the new prompt ran after the cached start, not from scratch
    assert lm.scorer.prefix_cache.read_tokens > 0
    assert len(lm.scorer.prefix_cache) == 2


def test_the_cache_stays_under_its_cap(tiny_lm):
    one = HFLanguageModel(tiny_lm.model, tiny_lm.tokenizer, prefix_cache_bytes=2**26)
    one.loglikelihood(requests(FIRST))
    size = one.scorer.prefix_cache.bytes
    assert size > 0
    small = HFLanguageModel(tiny_lm.model, tiny_lm.tokenizer, prefix_cache_bytes=int(size * 1.5))
    prompts = [PROMPT.replace("hot", word) for word in ("warm", "cool", "wet", "dry")]
    for prompt in prompts:
        assert_matches_reference(small, requests(FIRST, prompt))
        assert small.scorer.prefix_cache.bytes <= small.scorer.prefix_cache.max_bytes
    assert len(small.scorer.prefix_cache) == 1  # the most recent prompt only
    off = HFLanguageModel(tiny_lm.model, tiny_lm.tokenizer, prefix_cache_bytes=0)
    assert off.scorer.prefix_cache is None
    assert_matches_reference(off, requests(FIRST))


def test_a_longer_key_replaces_the_keys_it_extends():
    cache = PrefixCache(2**20)
    state = [(torch.zeros(1, 2, 6, 4), torch.ones(1, 2, 6, 4))]
    cache.put((1, 2, 3), [(k[:, :, :3], v[:, :, :3]) for k, v in state])
    cache.put((1, 2, 3, 4, 5, 6), state)
    assert list(cache.entries) == [(1, 2, 3, 4, 5, 6)]
    assert cache.bytes == 2 * 2 * 6 * 4 * 4
    held, kv = cache.longest((1, 2, 3, 4, 9))
    assert held == 4 and kv[0][0].shape[2] == 4 and torch.equal(kv[0][1], torch.ones(1, 2, 4, 4))
    assert cache.longest((7, 8)) == (0, [])


def test_no_cache_with_a_soft_prefix_or_gradients(lm, prefix_runs):
    soft = torch.randn(3, lm.model.config.hidden_size)
    lm.loglikelihood(requests(FIRST), soft_prefix=soft)
    assert len(lm.scorer.prefix_cache) == 0
    with torch.enable_grad():
        lm.loglikelihood_tensor(requests(FIRST))
    assert len(lm.scorer.prefix_cache) == 0


def test_the_cap_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(ENV_MB, "8")
    assert default_bytes() == 8 * 2**20
    monkeypatch.setenv(ENV_MB, "0")
    assert default_bytes() == 0
    monkeypatch.delenv(ENV_MB)
    assert default_bytes() == 256 * 2**20
    monkeypatch.setenv(ENV_MB, "lots")
    with pytest.raises(ValueError, match="APE_PREFIX_CACHE_MB='lots' is not a number"):
        default_bytes()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cache_on_cuda(tiny_lm, prefix_runs, dtype):
    """On the GPU the cached prefix is read as on the CPU: fp32 to the reference, bf16 close to
    it, and a prompt scored again gives its first scores back."""
    model = copy.deepcopy(tiny_lm.model).to("cuda", dtype)
    lm = HFLanguageModel(model, tiny_lm.tokenizer, name="tiny-cuda", prefix_cache_bytes=2**26)
    tol = TOL if dtype == torch.float32 else 1e-1
    first = assert_matches_reference(lm, requests(FIRST), tol)
    prefix_runs.clear()
    assert_matches_reference(lm, requests(SECOND), tol)
    assert prefix_runs == [] and lm.scorer.prefix_cache.read_tokens > 0
    np.testing.assert_allclose(lm.loglikelihood(requests(FIRST)), first, rtol=0, atol=tol)
