"""The fast scorer (`HFLanguageModel.loglikelihood`) against the one-pass-per-request reference.

Every batching trick (deduplication, prefix KV sharing, packing, batch splitting, OOM backoff)
must leave the numbers unchanged: in float32 the two agree to 1e-4 on every request.
"""

from __future__ import annotations

import copy
import inspect
import json
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from ape.search.rl.policy import PromptPolicy

import ape
import ape.kv_cache as kv_cache
import ape.vocab_head as vocab_head
from ape.lm import HFLanguageModel
from ape.packing import group_rows, make_rows
from ape.reference import reference_loglikelihood
from ape.scoring import PackedScorer
from ape.task import read_examples

TOL = 1e-4
OOM_MESSAGE = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.10 GiB total capacity)"
ANTONYMS = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "instruction_induction" / "antonyms"
)

INSTRUCTION = "Instruction: Write a word that means the opposite of the input word."
PAIRS = [
    ("hot", "cold"),
    ("up", "down"),
    ("happy", "sad"),
    ("early", "late"),
    ("strong", "weak"),
    ("open", "closed"),
    ("accept", "reject"),
    ("fortunate", "unfortunate"),
    ("visible", "invisible"),
    ("ascend", "descend"),
]
VERBS = ["Negate", "Reverse", "Invert", "Oppose", "Contradict"]
WORDS = (
    "the a model river stone light quickly under between seven question answer small "
    "large paper window across green because tomorrow number simple garden"
).split()


def shared_prefix_requests() -> list[tuple[str, str]]:
    """One instruction across many examples: the prefix KV path."""
    return [(f"{INSTRUCTION}\n\nInput: {x}\nOutput:", f" {y}") for x, y in PAIRS]


def unrelated_requests() -> list[tuple[str, str]]:
    """Contexts with nothing in common: the prefix-free group."""
    return [
        ("The capital of France is", " Paris"),
        ("2 + 2 =", " 4"),
        ("Translate to French: cheese ->", " fromage"),
        ("Q: What colour is the sky?\nA:", " Blue, mostly."),
        ("def add(a, b):\n    return", " a + b"),
        ("x", " y"),
    ]


def sentence(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def mixed_length_requests() -> list[tuple[str, str]]:
    """From 2 to ~200 tokens in one call, with single- and multi-token continuations."""
    return [
        ("Hi", " there"),
        (sentence(150, 1), " and so on until the end"),
        ("Input: cat\nOutput:", " dog"),
        (sentence(40, 2), " river"),
        ("A", " B C D E F G"),
        (sentence(90, 3), " window"),
        *shared_prefix_requests()[:4],
        *unrelated_requests()[:3],
    ]


def assert_matches_reference(lm: HFLanguageModel, requests, tol: float = TOL) -> np.ndarray:
    fast = lm.loglikelihood(requests)
    ref = reference_loglikelihood(lm, requests)
    assert fast.shape == (len(requests),)
    assert np.all(np.isfinite(fast))
    np.testing.assert_allclose(fast, ref, rtol=0, atol=tol)
    return fast


@pytest.fixture
def lm(tiny_lm, monkeypatch) -> HFLanguageModel:
    """The session's tiny model, with its batching settings restored after each test."""
    monkeypatch.setattr(tiny_lm, "max_batch_tokens", tiny_lm.max_batch_tokens)
    monkeypatch.setattr(tiny_lm, "pack_tokens", tiny_lm.pack_tokens)
    return tiny_lm


def _rows_in(packs) -> int:
    """Rows in one batch of packs, whichever way a pack holds its rows."""
    return sum(len(getattr(pack, "rows", pack)) for pack in packs)


@pytest.fixture
def forward_calls(monkeypatch) -> list[tuple[int, int]]:
    """Record (packs, rows) for every batch of suffixes the fast scorer runs."""
    calls: list[tuple[int, int]] = []
    original = PackedScorer.forward_batch

    def spy(self, packs, *args, **kwargs):
        calls.append((len(packs), _rows_in(packs)))
        return original(self, packs, *args, **kwargs)

    monkeypatch.setattr(PackedScorer, "forward_batch", spy)
    return calls


def fail_forward_above(monkeypatch, max_rows: int, message: str = OOM_MESSAGE) -> list[int]:
    """Make `forward_batch` raise RuntimeError(message) for batches of more than `max_rows`."""
    sizes: list[int] = []
    original = PackedScorer.forward_batch

    def forward(self, packs, *args, **kwargs):
        rows = _rows_in(packs)
        sizes.append(rows)
        if rows > max_rows:
            raise RuntimeError(message)
        return original(self, packs, *args, **kwargs)

    monkeypatch.setattr(PackedScorer, "forward_batch", forward)
    return sizes


def prefix_lengths(lm: HFLanguageModel, requests) -> list[int]:
    """The shared-prefix length of each group the scorer forms for `requests` (0: none)."""
    return [g.prefix_len for g in group_rows(rows_of(lm, lm.encode_pairs(requests)))]


def rows_of(lm: HFLanguageModel, pairs):
    """The rows the scorer runs for encoded `pairs`."""
    return make_rows(pairs, lm.max_length)


# ---------------------------------------------------------------- padding, packing, batching
SETTINGS = [(16, 32), (1, 1), (64, 200), (128, 2048), (256, 4096), (100_000, 10_000_000)]


@pytest.mark.parametrize(("pack_tokens", "max_batch_tokens"), SETTINGS)
def test_very_different_lengths_match_reference(lm, pack_tokens, max_batch_tokens):
    lm.pack_tokens, lm.max_batch_tokens = pack_tokens, max_batch_tokens
    requests = mixed_length_requests()
    lengths = [len(c) + len(k) for c, k in lm.encode_pairs(requests)]
    assert min(lengths) <= 3 and max(lengths) >= 150  # the premise: very different lengths
    assert_matches_reference(lm, requests)


def test_results_do_not_depend_on_pack_and_batch_sizes(lm):
    requests = mixed_length_requests() + shared_prefix_requests()
    results = []
    for pack_tokens, max_batch_tokens in SETTINGS:
        lm.pack_tokens, lm.max_batch_tokens = pack_tokens, max_batch_tokens
        results.append(lm.loglikelihood(requests))
    for other in results[1:]:
        np.testing.assert_allclose(other, results[0], rtol=0, atol=TOL)


def test_small_budgets_force_many_packs_and_batches(lm, forward_calls):
    lm.pack_tokens, lm.max_batch_tokens = 16, 32
    assert_matches_reference(lm, mixed_length_requests() + shared_prefix_requests())
    assert len(forward_calls) >= 4  # many batches
    assert any(rows > packs for packs, rows in forward_calls)  # some pack holds several rows
    assert any(packs > 1 for packs, _ in forward_calls)  # some batch holds several packs


def test_large_budgets_need_at_most_one_batch_per_group(lm, forward_calls):
    lm.pack_tokens, lm.max_batch_tokens = 100_000, 10_000_000
    requests = shared_prefix_requests() + unrelated_requests()
    assert_matches_reference(lm, requests)
    assert 1 <= len(forward_calls) <= len(prefix_lengths(lm, requests))
    assert sum(rows for _, rows in forward_calls) == len(requests)  # no row scored twice


@pytest.mark.parametrize("head_rows", [1, 5])
def test_positions_projected_a_few_at_a_time_match_reference(lm, monkeypatch, head_rows):
    monkeypatch.setattr(vocab_head, "HEAD_ROWS", head_rows)
    assert_matches_reference(lm, mixed_length_requests() + shared_prefix_requests())


# ---------------------------------------------------------------- shared prefixes
def test_one_instruction_across_many_examples_uses_the_prefix_cache(lm):
    requests = shared_prefix_requests()
    instruction_tokens = len(lm.tokenizer(INSTRUCTION, add_special_tokens=False)["input_ids"])
    assert prefix_lengths(lm, requests)[0] >= instruction_tokens
    assert_matches_reference(lm, requests)


@pytest.mark.parametrize(("pack_tokens", "max_batch_tokens"), [(16, 32), (256, 4096)])
def test_mixed_related_and_unrelated_contexts(lm, pack_tokens, max_batch_tokens):
    lm.pack_tokens, lm.max_batch_tokens = pack_tokens, max_batch_tokens
    other = "Instruction: Translate the word into French.\n\nInput: {}\nOutput:"
    requests = [
        *unrelated_requests(),
        *shared_prefix_requests(),
        *[
            (other.format(x), f" {y}")
            for x, y in [("cat", "chat"), ("dog", "chien"), ("sea", "mer")]
        ],
        *unrelated_requests()[::-1],
    ]
    prefixes = prefix_lengths(lm, requests)
    assert 0 in prefixes and sum(p > 0 for p in prefixes) >= 2  # prefix groups and the rest
    assert_matches_reference(lm, requests)


@pytest.mark.parametrize(("pack_tokens", "max_batch_tokens"), [(16, 32), (256, 4096)])
def test_shared_prefix_ending_exactly_at_the_first_scored_token(lm, pack_tokens, max_batch_tokens):
    lm.pack_tokens, lm.max_batch_tokens = pack_tokens, max_batch_tokens
    context = f"{INSTRUCTION}\n\nInput: hot\nOutput:"
    requests = [
        (context, " cold and freezing"),
        (context, " chilly, icy"),
        (context, " cool"),
        (context, " cold"),
        (context + " cold", " indeed"),  # its first scored position lies past the others'
    ]
    rows = rows_of(lm, lm.encode_pairs(requests))
    groups = [g for g in group_rows(rows) if g.prefix_len]
    assert groups, "the premise: these rows share a prefix"
    assert any(g.prefix_len == min(r.first_scored for r in g.rows) for g in groups)
    assert_matches_reference(lm, requests)


def test_rows_with_one_token_suffix_after_the_prefix(lm):
    """One-token continuations of one context leave a single token after the shared prefix."""
    context = f"{INSTRUCTION}\n\nInput: ascend\nOutput:"
    requests = [(context, f" {w}") for w in ("descend", "fall", "drop", "sink")] + [
        (f"{INSTRUCTION}\n\nInput: {x}\nOutput:", f" {y}") for x, y in PAIRS[:3]
    ]
    assert_matches_reference(lm, requests)


# ---------------------------------------------------------------- the tokenization seam
def test_trailing_space_in_context_moves_to_the_continuation(lm):
    spaced, plain = ("Output: ", "yes"), ("Output:", " yes")
    assert lm.encode_pairs([spaced]) == lm.encode_pairs([plain])
    fast = assert_matches_reference(lm, [spaced, plain, ("Output: ", " yes"), ("Output:  ", "no")])
    assert fast[0] == pytest.approx(fast[1], abs=1e-6)


def _lm_eval_split(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's split: context tokenized alone, the rest of the joint tokens."""
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation

    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    context_ids = encode(stripped)
    return context_ids, encode(stripped + continuation)[len(context_ids) :]


SEAM_REQUESTS = [
    ("Input: cat\nOutput:", " dog"),
    ("Output: ", "yes"),
    ("The capital of France is", " Paris"),
    ("Answer:", " 42"),
    ("hel", "lo world"),  # merges across the seam
    ("un", "believable things"),
]


def test_continuation_tokens_split_like_lm_eval(lm):
    for request in SEAM_REQUESTS:
        [(_, continuation_ids)] = lm.encode_pairs([request])
        assert continuation_ids == _lm_eval_split(lm.tokenizer, *request)[1], request


def test_context_tokens_split_like_lm_eval_without_a_merge(lm):
    for request in SEAM_REQUESTS[:4]:
        assert lm.encode_pairs([request]) == [_lm_eval_split(lm.tokenizer, *request)], request


def test_a_continuation_that_merges_with_the_context_matches_reference(lm):
    context, continuation = "hel", "lo world"
    alone = lm.tokenizer(context, add_special_tokens=False)["input_ids"]
    joint = lm.tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    assert joint[: len(alone)] != alone  # the premise: "hel" + "lo" becomes one token "hello"
    requests = [(context, continuation), ("hel", "p me"), ("Say hel", "lo world"), ("hel", " lo")]
    assert_matches_reference(lm, requests)


def test_context_tokens_split_like_lm_eval_across_a_merge(lm):
    request = ("hel", "lo world")
    assert lm.encode_pairs([request]) == [_lm_eval_split(lm.tokenizer, *request)]


def test_a_continuation_with_no_tokens_of_its_own_alone_raises_value_error(lm):
    with pytest.raises(ValueError, match="request 0"):
        lm.loglikelihood([("hel", "lo")])


def test_a_continuation_with_no_tokens_of_its_own_in_a_batch_raises_value_error(lm):
    with pytest.raises(ValueError, match="request 1"):
        lm.loglikelihood([("The dog", " barks"), ("The cat", "s")])


# ---------------------------------------------------------------- empty context
def test_empty_context_conditions_on_the_prefix_token(lm):
    requests = [("", "hello"), ("", " hello world"), ("", "The capital of France is Paris")]
    for context_ids, continuation_ids in lm.encode_pairs(requests):
        assert context_ids == [lm.prefix_token_id]
        assert continuation_ids
    assert lm.prefix_token_id == lm.tokenizer.bos_token_id
    assert_matches_reference(lm, requests + shared_prefix_requests()[:2])


# ---------------------------------------------------------------- deduplication
def test_one_token_labels_of_one_context_share_a_row(lm):
    context = "Review: a wonderful film.\nSentiment:"
    labels = [" positive", " negative", " neutral", " mixed"]
    requests = [(context, label) for label in labels]
    pairs = lm.encode_pairs(requests)
    assert all(len(continuation) == 1 for _, continuation in pairs)
    assert len(rows_of(lm, pairs)) == 1
    fast = assert_matches_reference(lm, requests)
    assert len(set(fast.tolist())) == len(labels)


def test_duplicate_requests_get_identical_scores(lm):
    base = shared_prefix_requests()[:3] + unrelated_requests()[:2]
    requests = base + base[::-1] + base[:1]
    fast = assert_matches_reference(lm, requests)
    n = len(base)
    np.testing.assert_array_equal(fast[:n], fast[n : 2 * n][::-1])
    assert fast[-1] == fast[0]


def test_same_tokens_split_at_different_places_share_a_row(lm):
    requests = [("Input: a b", " c"), ("Input: a", " b c"), ("Input:", " a b c")]
    pairs = lm.encode_pairs(requests)
    assert len({tuple(c + k) for c, k in pairs}) == 1
    assert len(rows_of(lm, pairs)) == 1
    fast = assert_matches_reference(lm, requests)
    assert fast[2] < fast[1] < fast[0]  # more scored tokens, lower log-likelihood


# ---------------------------------------------------------------- counts and order
def test_multi_token_continuations_and_counts(lm):
    requests = [
        ("Q: Name three colours.\nA:", " red, green and blue"),
        ("Q: Name three colours.\nA:", " red"),
        ("Once upon a time", " there lived a king who had three daughters."),
        ("", "a b c d e f"),
    ]
    sums, counts = lm.loglikelihood(requests, return_counts=True)
    expected = [len(continuation) for _, continuation in lm.encode_pairs(requests)]
    np.testing.assert_array_equal(counts, expected)
    assert counts.dtype.kind == "i"
    assert counts[0] > 1 and counts[1] == 1
    np.testing.assert_allclose(sums, reference_loglikelihood(lm, requests), rtol=0, atol=TOL)
    np.testing.assert_array_equal(lm.loglikelihood(requests), sums)


def test_results_come_back_in_request_order(lm):
    requests = mixed_length_requests() + shared_prefix_requests() + unrelated_requests()
    fast = assert_matches_reference(lm, requests)
    order = list(range(len(requests)))
    random.Random(7).shuffle(order)
    shuffled = lm.loglikelihood([requests[i] for i in order])
    np.testing.assert_allclose(shuffled, fast[order], rtol=0, atol=TOL)


# ---------------------------------------------------------------- the window
def _the_times(n_tokens: int) -> str:
    return "the" + " the" * (n_tokens - 1)


def test_a_context_filling_the_window_matches_reference(lm):
    assert lm.max_length == 256
    near = (_the_times(255), " end")  # 256 tokens: 255 inputs, the last is only a target
    full = (_the_times(256), " end")  # 257 tokens: exactly the window of inputs
    lengths = [len(c) + len(k) for c, k in lm.encode_pairs([near, full])]
    assert lengths == [256, 257]
    assert_matches_reference(lm, [near, full, ("Hi", " there"), (sentence(120, 4), " end")])


def test_a_request_longer_than_the_window_raises(lm):
    too_long = (_the_times(257), " end")
    assert sum(map(len, lm.encode_pairs([too_long])[0])) == 258
    with pytest.raises(ValueError, match=r"request 1 .*window of 256 tokens"):
        lm.loglikelihood([("Hi", " there"), too_long, ("Hi", " you")])


def test_an_empty_continuation_raises(lm):
    with pytest.raises(ValueError, match="request 2 has an empty continuation"):
        lm.loglikelihood([("a", " b"), ("c", " d"), ("context", "")])


# ---------------------------------------------------------------- out-of-memory backoff
def test_out_of_memory_halves_the_batch_and_keeps_the_scores(lm, monkeypatch):
    requests = mixed_length_requests() + shared_prefix_requests() + unrelated_requests()
    expected = reference_loglikelihood(lm, requests)
    lm.pack_tokens, lm.max_batch_tokens = 256, 1_000_000
    budget = lm.max_batch_tokens
    sizes = fail_forward_above(monkeypatch, max_rows=3)
    fast = lm.loglikelihood(requests)
    np.testing.assert_allclose(fast, expected, rtol=0, atol=TOL)
    assert max(sizes) > 3  # the premise: some batch was too big and failed
    assert lm.max_batch_tokens < budget
    assert lm.pack_tokens < 256


def test_out_of_memory_on_a_single_row_propagates(lm, monkeypatch):
    fail_forward_above(monkeypatch, max_rows=0)
    with pytest.raises(RuntimeError, match="out of memory"):
        lm.loglikelihood(unrelated_requests())


def test_other_runtime_errors_propagate_without_backoff(lm, monkeypatch):
    budget = lm.max_batch_tokens
    sizes = fail_forward_above(monkeypatch, max_rows=0, message="shape mismatch in layer 3")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        lm.loglikelihood(shared_prefix_requests())
    assert len(sizes) == 1
    assert lm.max_batch_tokens == budget


def test_out_of_memory_in_any_forward_pass_backs_off(lm, monkeypatch):
    """OOM raised by the decoder itself, whichever pass runs it (shared prefixes included)."""
    instructions = [f"Instruction: {verb} the input word, then stop." for verb in VERBS]
    requests = [
        (f"{i}\n\nInput: {x}\nOutput:", f" {y}") for i in instructions for x, y in PAIRS[:3]
    ]
    assert sum(p > 0 for p in prefix_lengths(lm, requests)) == len(instructions)
    expected = reference_loglikelihood(lm, requests)
    base = type(lm.model.base_model)
    original = base.forward

    def forward(self, *args, **kwargs):
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        if ids.shape[0] > 2:
            raise RuntimeError(OOM_MESSAGE)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(base, "forward", forward)
    fast = lm.loglikelihood(requests)
    np.testing.assert_allclose(fast, expected, rtol=0, atol=TOL)


# ---------------------------------------------------------------- the KV cache API
def _ids(lm: HFLanguageModel, text: str) -> torch.Tensor:
    return torch.tensor([lm.tokenizer(text, add_special_tokens=False)["input_ids"]])


def test_the_cache_goes_by_the_name_the_forward_declares(tiny_lm):
    base = tiny_lm.model.base_model
    name = kv_cache.cache_argument(base)
    assert name in {"cache", "past_key_values"}
    assert name in inspect.signature(type(base).forward).parameters


def test_a_prefix_cache_is_read_not_silently_ignored(tiny_lm):
    """The continuation after a cached prefix equals the same tokens in one full pass."""
    base = tiny_lm.model.base_model
    ids = _ids(tiny_lm, sentence(20, 5))
    cut = 12
    with torch.inference_mode():
        full = base(input_ids=ids).last_hidden_state[:, cut:]
        _, cache = kv_cache.run(base, input_ids=ids[:, :cut], use_cache=True)
        assert cache is not None and len(kv_cache.layer_states(cache)) == 2
        rest, _ = kv_cache.run(base, cache=cache, input_ids=ids[:, cut:])
        alone = base(input_ids=ids[:, cut:]).last_hidden_state
    torch.testing.assert_close(rest.last_hidden_state, full, rtol=0, atol=1e-5)
    assert (alone - full).abs().max() > 1e-2  # the premise: without the prefix, it differs


def test_a_cache_built_from_prefix_states_continues_like_the_original(tiny_lm):
    base = tiny_lm.model.base_model
    ids = _ids(tiny_lm, sentence(16, 6))
    with torch.inference_mode():
        full = base(input_ids=ids.expand(3, -1)).last_hidden_state[:, 10:]
        _, cache = kv_cache.run(base, input_ids=ids[:, :10], use_cache=True)
        state = kv_cache.layer_states(cache)
        expanded = kv_cache.expanded_cache(tiny_lm.model.config, state, 3)
        rest, _ = kv_cache.run(base, cache=expanded, input_ids=ids[:, 10:].expand(3, -1))
    torch.testing.assert_close(rest.last_hidden_state, full, rtol=0, atol=1e-5)


def test_an_older_forward_gets_the_cache_as_past_key_values():
    """transformers 4.x: the forward declares `past_key_values` and returns it under that name."""

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs):
            self.seen = past_key_values
            return {"last_hidden_state": input_ids, "past_key_values": "returned"}

    old, given = Old(), object()
    assert kv_cache.cache_argument(old) == "past_key_values"
    _, returned = kv_cache.run(old, cache=given, input_ids=torch.zeros(1, 1))
    assert old.seen is given and returned == "returned"


def test_layer_states_of_an_indexable_cache():
    """transformers before the layered cache: `cache[i]` is layer i's (keys, values)."""
    keys, values = torch.zeros(1, 2, 3, 4), torch.ones(1, 2, 3, 4)

    class Indexable:
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return (keys + i, values + i)

    states = kv_cache.layer_states(Indexable())
    assert len(states) == 2 and torch.equal(states[1][0], keys + 1)


def test_the_rl_policy_reads_its_cache(tiny_lm):
    """Each state the policy samples from is the full pass's last state over what it wrote."""
    policy = PromptPolicy(tiny_lm, hidden=8, top_k=16, seed=0)
    rollout = policy.sample(2, 4, torch.Generator().manual_seed(0))
    context = _ids(tiny_lm, policy.context).expand(2, -1)
    base = tiny_lm.model.base_model
    with torch.inference_mode():
        for t in range(1, 4):
            ids = torch.cat([context, rollout.tokens[:, :t]], dim=1)
            expected = base(input_ids=ids).last_hidden_state[:, -1]
            torch.testing.assert_close(rollout.states[:, t], expected, rtol=0, atol=1e-5)


def test_no_deprecated_cache_argument_is_passed(tiny_lm):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        tiny_lm.loglikelihood(shared_prefix_requests()[:3])
        PromptPolicy(tiny_lm, hidden=8, top_k=16).sample(1, 2, None, greedy=True)


# ---------------------------------------------------------------- the real model; CUDA
@pytest.fixture(scope="module")
def embedded_lm() -> HFLanguageModel:
    return ape.load_model(device="cpu")  # fp32 on CPU, so 1e-4 is a fair bar


@pytest.mark.slow
def test_embedded_model_matches_reference_on_antonyms(embedded_lm, monkeypatch):
    if not (ANTONYMS / "test.jsonl").is_file():
        pytest.skip(f"shared antonyms data not found at {ANTONYMS}")
    examples = read_examples(ANTONYMS / "test.jsonl")[:8]
    meta = json.loads((ANTONYMS / "meta.json").read_text(encoding="utf-8"))
    instructions = [*meta["human_instructions"][:4], ""]
    requests = [r for text in instructions for r in ape.Prompt(text).requests(examples)]
    assert len(requests) == 40
    expected = reference_loglikelihood(embedded_lm, requests)
    for pack_tokens, max_batch_tokens in [(256, 4096), (16, 48)]:
        monkeypatch.setattr(embedded_lm, "pack_tokens", pack_tokens)
        monkeypatch.setattr(embedded_lm, "max_batch_tokens", max_batch_tokens)
        fast = embedded_lm.loglikelihood(requests)
        assert np.max(np.abs(fast - expected)) < TOL, (pack_tokens, max_batch_tokens)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_model_in_bf16_on_cuda_is_close_to_fp32(tiny_lm):
    model = copy.deepcopy(tiny_lm.model).to("cuda", torch.bfloat16)
    cuda_lm = HFLanguageModel(model, tiny_lm.tokenizer, name="tiny-cuda")
    requests = shared_prefix_requests() + unrelated_requests() + [("", "hello world")]
    fast = cuda_lm.loglikelihood(requests)
    expected = reference_loglikelihood(tiny_lm, requests)
    np.testing.assert_allclose(fast, expected, rtol=0, atol=1e-1)
