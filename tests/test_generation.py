"""Shared-prompt generation (ape/shared_generation.py) against the model's own `generate`.

Greedy decoding must match `model.generate(do_sample=False)` token for token; sampling must
match a naive reference loop (no cache, one row at a time) fed the same uniforms, and the
sampler must draw from the distribution transformers' temperature and top-p warpers define.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

import ape.hf_generate as hf_generate
import ape.next_token as next_token
import ape.shared_generation as sg
from ape.hf_generate import SENTENCE_END, cut_at

PAIRS = [("hot", "cold"), ("up", "down"), ("wet", "dry"), ("old", "new")]
DEMOS = "".join(f"Input: {a}\nOutput: {b}\n\n" for a, b in PAIRS)
# Three share a long few-shot prefix (one group), one shares nothing, two are one token long.
PROMPTS = [
    f"Write the opposite word.\n\n{DEMOS}Input: {word}\nOutput:" for word in ("big", "fast", "on")
] + ["The capital of France is", "Hello", "a"]


def reference_ids(lm, prompt: str, max_new_tokens: int) -> list[int]:
    """`model.generate`'s greedy tokens for one prompt alone (no padding), up to its EOS."""
    ids = hf_generate.reference_tokens(
        lm.model, lm.tokenizer, [prompt], 1, 0.0, 1.0, max_new_tokens
    )[0].tolist()
    eos = hf_generate.eos_ids(lm.model, lm.tokenizer)
    return ids[: next((k for k, t in enumerate(ids) if t in eos), len(ids))]


def ours(lm, prompts, sampling, n=1, batch_rows=32) -> list[list[list[int]]]:
    tokens = hf_generate.tokenize(lm.tokenizer, prompts)
    return sg.generate_tokens(lm.model, lm.tokenizer, tokens, sampling, n=n, batch_rows=batch_rows)


def greedy(lm, max_new_tokens: int, **kwargs) -> sg.Sampling:
    eos = hf_generate.eos_ids(lm.model, lm.tokenizer)
    return sg.Sampling(max_new_tokens=max_new_tokens, eos=eos, **kwargs)


class Recorder:
    """Records the input shape of every decoder forward pass of `model`."""

    def __init__(self, model):
        self.shapes: list[tuple[int, int]] = []
        self.handle = model.base_model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.shapes.append(tuple(kwargs["input_ids"].shape))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ------------------------------------------------------------------------------ greedy
def test_greedy_matches_model_generate_token_for_token(tiny_lm, single_thread):
    jobs = sg.plan(hf_generate.tokenize(tiny_lm.tokenizer, PROMPTS), 1, True)
    assert any(job.prefix_len >= 20 for job in jobs), "the few-shot prompts share a prefix"
    got = ours(tiny_lm, PROMPTS, greedy(tiny_lm, 12))
    for prompt, samples in zip(PROMPTS, got, strict=True):
        assert samples == [reference_ids(tiny_lm, prompt, 12)]


def test_greedy_is_the_same_in_any_batch_and_copied_over_samples(tiny_lm, single_thread):
    prompts = PROMPTS + PROMPTS[:2]  # repeats decode once and are copied
    whole = ours(tiny_lm, prompts, greedy(tiny_lm, 10), n=2)
    assert ours(tiny_lm, prompts, greedy(tiny_lm, 10), n=2, batch_rows=1) == whole
    assert all(samples[0] == samples[1] for samples in whole)
    assert whole[-2:] == whole[:2]


def test_each_prompt_and_shared_prefix_runs_once(tiny_lm, single_thread):
    tokens = hf_generate.tokenize(tiny_lm.tokenizer, PROMPTS[:3])
    sampling = sg.Sampling(temperature=1.0, seed=0, max_new_tokens=1)
    with Recorder(tiny_lm.model) as seen:
        out = sg.generate_tokens(tiny_lm.model, tiny_lm.tokenizer, tokens, sampling, n=5)
    assert [len(s) for s in out] == [5, 5, 5]
    # One token each: the shared prefix once, then the three suffixes once (not 15 rows).
    prefix, suffixes = seen.shapes
    assert prefix[0] == 1 and suffixes[0] == 3
    assert prefix[1] + 3 * suffixes[1] < sum(len(t) for t in tokens)


# ------------------------------------------------------------------------------ sampling
def warped_distribution(logits: torch.Tensor, temperature: float, top_p: float) -> np.ndarray:
    """What `model.generate` samples from: transformers' own temperature and top-p warpers."""
    warped = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits))
    return torch.softmax(warped, -1)[0].numpy()


@pytest.mark.parametrize("vocab", [12, 600])
def test_sampler_draws_the_warped_distribution(vocab):
    torch.manual_seed(3)
    u = (torch.arange(4000, dtype=torch.float32) + 0.5) / 4000  # a grid: |error| <= 1 / 4000
    # Peaked rows keep their nucleus in the sorted head of 256; flat ones sort in full.
    for scale in (6.0, 0.5):
        logits = torch.randn(1, vocab) * scale
        for temperature, top_p in [(1.0, 1.0), (0.7, 0.9), (1.5, 0.5), (0.3, 0.99)]:
            expected = warped_distribution(logits, temperature, top_p)
            picked = next_token.choose(logits.expand(len(u), -1), u, temperature, top_p)
            freq = np.bincount(picked.numpy(), minlength=vocab) / len(u)
            np.testing.assert_allclose(freq, expected, atol=3e-4)
    assert next_token.choose(logits, None, 0.0, 1.0).item() == logits.argmax().item()


def test_sampler_rows_do_not_depend_on_their_neighbours():
    torch.manual_seed(4)
    logits = torch.randn(64, 600) * torch.linspace(0.1, 8, 64)[:, None]  # flat to peaked
    u = torch.rand(64)
    together = next_token.choose(logits, u, 0.8, 0.9)
    alone = [next_token.choose(logits[i : i + 1], u[i : i + 1], 0.8, 0.9).item() for i in range(64)]
    assert together.tolist() == alone


# How far a draw may be from a boundary of the inverse CDF for float rounding to move it across:
# batched and unbatched logits differ in the last bits, and on some CPUs (AVX-512 ones) that flips
# a token of the tiny model, whose distribution is nearly flat (~2e-5 per token). The draws are
# compared without a nucleus (top_p 1): sorting near-equal probabilities is itself rounding-
# sensitive; the nucleus is checked against transformers' warpers above.
ROUNDING = 1e-5


def naive_check(lm, prompt_ids, sample, u_row, sampling) -> int:
    """Replay `sample` with the reference sampler (the whole sequence recomputed each step, one
    row, no cache); each token must be its pick at the same draw, or at a draw within ROUNDING
    of it (a rounding tie). Returns how many tokens were such ties."""
    ids, ties = list(prompt_ids), 0
    for t in range(len(sample) + 1):
        if t == sampling.max_new_tokens:
            break
        logits = lm.model(torch.tensor([ids])).logits[:, -1].float()
        token = sample[t] if t < len(sample) else None  # None: the sample ended with EOS here

        draws = [u_row[t], max(u_row[t] - ROUNDING, 0.0), min(u_row[t] + ROUNDING, 1 - 1e-9)]
        picks = [
            int(pick)
            for pick in next_token.choose(
                logits.expand(3, -1), torch.tensor(draws), sampling.temperature, sampling.top_p
            )
        ]
        allowed = sampling.eos if token is None else {token}
        assert allowed & set(picks), (t, token, picks)
        ties += picks[0] not in allowed
        if token is not None:
            ids.append(token)
    return ties


def test_sampling_matches_a_naive_sampler_with_the_same_draws(tiny_lm, single_thread):
    sampling = greedy(tiny_lm, 8, temperature=0.8, top_p=1.0, seed=11)
    prompts = PROMPTS[:4]
    got = ours(tiny_lm, prompts, sampling, n=3, batch_rows=5)
    tokens = hf_generate.tokenize(tiny_lm.tokenizer, prompts)
    ties = 0
    with torch.inference_mode():
        for i, samples in enumerate(got):
            u = next_token.uniforms(
                [(sampling.seed, i, j) for j in range(3)], sampling.max_new_tokens
            )
            ties += sum(
                naive_check(tiny_lm, tokens[i], samples[j], u[j], sampling) for j in range(3)
            )
    assert ties <= 3, f"{ties} draws on a rounding tie: more than rounding explains"
    assert len({tuple(s) for s in got[0]}) > 1, "samples of one prompt differ"


def test_seeded_sampling_is_reproducible_and_leaves_the_global_rng(tiny_lm, single_thread):
    kwargs = dict(n=3, temperature=1.0, max_new_tokens=8)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = tiny_lm.generate(PROMPTS, seed=5, **kwargs)
    assert torch.equal(torch.get_rng_state(), state)
    assert tiny_lm.generate(PROMPTS, seed=5, batch_size=2, **kwargs) == first
    assert tiny_lm.generate(PROMPTS, seed=6, **kwargs) != first
    # A prompt's samples depend on its index and the seed only, not on its neighbours.
    assert tiny_lm.generate(PROMPTS[:2], seed=5, **kwargs) == first[:2]


def test_temperature_and_top_p_are_applied(tiny_lm, single_thread):
    cold = tiny_lm.generate(PROMPTS, n=2, temperature=1e-7, max_new_tokens=6, seed=1)
    narrow = tiny_lm.generate(PROMPTS, n=2, temperature=5.0, top_p=1e-6, max_new_tokens=6, seed=1)
    hot = tiny_lm.generate(PROMPTS, n=2, temperature=5.0, max_new_tokens=6, seed=1)
    plain = tiny_lm.generate(PROMPTS, n=2, max_new_tokens=6)
    assert cold == plain and narrow == plain  # no spread left: the argmax
    assert sum(a != b for a, b in zip(hot, plain, strict=True)) >= 4


# ------------------------------------------------------------------------------ stopping
def test_rows_stop_at_stop_strings_and_leave_the_batch(tiny_lm, single_thread):
    prompts = PROMPTS[3:5]  # no shared prefix: one prefill pass, then one pass per step
    free = ours(tiny_lm, prompts, greedy(tiny_lm, 12))
    assert [len(s[0]) for s in free] == [12, 12]
    stop = tiny_lm.tokenizer.decode(free[0][0][1:3])  # prompt 0's 2nd and 3rd new tokens
    assert stop not in tiny_lm.tokenizer.decode(free[1][0])
    with Recorder(tiny_lm.model) as seen:
        cut = ours(tiny_lm, prompts, greedy(tiny_lm, 12, stop=(stop,)))
    assert cut == [[free[0][0][:3]], free[1]]
    # After prompt 0's stop its row leaves the batch; no step runs after the last row is done.
    assert [batch for batch, _ in seen.shapes[1:]] == [2, 2] + [1] * 9
    texts = tiny_lm.generate(prompts, max_new_tokens=12, stop=[stop])
    full = tiny_lm.generate(prompts, max_new_tokens=12)
    assert texts == [[cut_at(t[0], [stop])] for t in full]
    assert texts[0][0] + stop == full[0][0][: len(texts[0][0] + stop)]


def test_waiting_prompts_join_a_half_empty_batch_with_the_same_texts(tiny_lm, single_thread):
    """batch_rows 4: once at most two rows are left, waiting prompts are prefilled and decode
    beside them; each text is still model.generate's, and seeded samples are those of one big
    batch."""
    words = ("big", "fast", "on", "light", "early", "loud", "in", "full")
    # One shared few-shot prefix; the last word differs, and so does what the model goes on with.
    prompts = [f"Write the opposite word.\n\n{DEMOS}Input: {w}\nOutput: {w}" for w in words]
    free = ours(tiny_lm, prompts, greedy(tiny_lm, 8))
    # Every other row ends at its second token (an EOS of its own); the rest run longer.
    eos = frozenset(sample[0][1] for sample in free[::2])
    sampling = sg.Sampling(max_new_tokens=8, eos=eos)
    with Recorder(tiny_lm.model) as seen:
        got = ours(tiny_lm, prompts, sampling, batch_rows=4)
    assert got == ours(tiny_lm, prompts, sampling, batch_rows=64)
    for prompt, samples in zip(prompts, got, strict=True):  # model.generate's, to the EOS
        tokens = samples[0]
        assert tokens == reference_ids(tiny_lm, prompt, 8)[: len(tokens)]
        assert len(tokens) == 8 or free[prompts.index(prompt)][0][len(tokens)] in eos
    # A prefill after decoding has begun, whose rows then step beside rows already running.
    shapes = seen.shapes
    first_step = next(k for k, (_, width) in enumerate(shapes) if width == 1)
    assert any(
        shapes[k][1] > 1 and shapes[k + 1][0] > shapes[k][0]
        for k in range(first_step, len(shapes) - 1)
    )
    assert max(rows for rows, _ in seen.shapes) <= 4
    hot = sg.Sampling(temperature=1.0, seed=3, max_new_tokens=6, eos=eos)
    assert ours(tiny_lm, prompts, hot, n=3, batch_rows=4) == ours(tiny_lm, prompts, hot, n=3)


def test_eos_ends_a_row_and_the_batch_ends_when_all_are_done(tiny_lm, single_thread):
    free = ours(tiny_lm, PROMPTS[:1], greedy(tiny_lm, 10))[0][0]
    end = free.index(free[3])
    with Recorder(tiny_lm.model) as seen:
        out = ours(tiny_lm, PROMPTS[:1], sg.Sampling(max_new_tokens=10, eos=frozenset({free[3]})))
    assert out[0][0] == free[:end]
    assert len(seen.shapes) == 1 + end  # the prefill, then one step per token before the EOS


def test_a_short_shared_prefix_is_not_worth_a_pass(tiny_lm, single_thread):
    prompts = [f"Write the opposite word.\n\nInput: {word}\nOutput:" for word in ("big", "on")]
    tokens = hf_generate.tokenize(tiny_lm.tokenizer, prompts)
    jobs = sg.plan(tokens, 1, True)
    assert 0 < jobs[0].prefix_len < sg.MIN_SAVED_TOKENS  # a group, but sharing saves too little
    with Recorder(tiny_lm.model) as seen:
        out = ours(tiny_lm, prompts, greedy(tiny_lm, 1))
    assert seen.shapes == [(2, max(len(t) for t in tokens))]  # both whole, in one pass
    assert out == [[reference_ids(tiny_lm, p, 1)] for p in prompts]


def test_stop_patterns_and_edge_cases(tiny_lm):
    text = 'Write the antonym." Then stop.\nNext'
    assert cut_at(text, [SENTENCE_END]) == "Write the antonym."
    assert cut_at(text, ["\n", SENTENCE_END]) == "Write the antonym."
    assert cut_at("e.g. this", [SENTENCE_END]) == "e.g."
    assert cut_at("no end", [SENTENCE_END, "\n"]) == "no end"
    assert tiny_lm.generate([], n=2) == []
    assert tiny_lm.generate(["x", ""], n=2, max_new_tokens=0) == [["", ""], ["", ""]]
    assert len(tiny_lm.generate([""], max_new_tokens=3)[0]) == 1


# ------------------------------------------------------------------------------ real model, GPU
@pytest.mark.slow
def test_greedy_matches_model_generate_on_the_embedded_model(single_thread):
    from ape.models import load_model

    lm = load_model("smollm2-135m", device="cpu")
    prompts = PROMPTS[:4] + [lm.chat_prompt("Name a fruit.")]
    got = ours(lm, prompts, greedy(lm, 16))
    for prompt, samples in zip(prompts, got, strict=True):
        assert samples == [reference_ids(lm, prompt, 16)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_prompt_generation_on_cuda(tiny_lm, dtype):
    lm = copy.copy(tiny_lm)
    lm.model = copy.deepcopy(tiny_lm.model).to("cuda", dtype)
    got = ours(lm, PROMPTS, greedy(lm, 10))
    if dtype == torch.float32:
        assert got == [[reference_ids(lm, p, 10)] for p in PROMPTS]
    sampled = lm.generate(PROMPTS, n=3, temperature=0.9, max_new_tokens=8, seed=2)
    assert lm.generate(PROMPTS, n=3, temperature=0.9, max_new_tokens=8, seed=2) == sampled


def test_groups_decode_together_with_each_groups_own_texts(tiny_lm, single_thread):
    kwargs = dict(n=3, temperature=1.0, max_new_tokens=8)
    groups = [(PROMPTS[:2], 5, False), (PROMPTS[2:5], 9, True), (PROMPTS[:1], 5, False)]
    alone = [tiny_lm.generate(p, seed=seed, chat=chat, **kwargs) for p, seed, chat in groups]
    with Recorder(tiny_lm.model) as seen:
        together = tiny_lm.generate_groups(groups, **kwargs)
    assert together == alone
    assert together[2] == together[0][:1]  # a group's texts depend on its seed and prompts
    assert together[1] != tiny_lm.generate(PROMPTS[2:5], seed=5, chat=True, **kwargs)
    # One decoding run: a pass per new token (and prefills), not one per token per group.
    assert len(seen.shapes) <= 8 + 3
