"""Greedy paths read off scoring (ape/greedy_paths.py) against the model's own `generate`.

A scored continuation shows the greedy path up to where the model leaves it; greedy generation
that starts from recorded paths must give the texts it gives without them.
"""

from __future__ import annotations

import copy

import pytest
import torch

import ape.hf_generate as hf_generate
from ape.greedy_paths import GreedyPaths, path_of, settled
from ape.lm import HFLanguageModel
from tests.test_generation import PROMPTS, Recorder, reference_ids

FEW_SHOT = PROMPTS[:3]


@pytest.fixture
def lm(tiny_lm, single_thread):
    """The tiny model with an empty path memo, left empty (the fixture is shared)."""
    tiny_lm.greedy_paths.clear()
    yield tiny_lm
    tiny_lm.greedy_paths.clear()


def test_a_path_runs_to_the_first_miss_and_takes_the_pick_there():
    assert path_of([5, 6, 7], [5, 9, 7, 8]) == [5, 9]
    assert path_of([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]  # the last target was fed
    assert path_of([5, 6, 7], [5, 6, 7]) == [5, 6, 7]  # it was not
    assert path_of([5], [4, 3]) == [4]


def test_a_settled_path_ends_at_eos_the_cap_or_a_stop():
    def text(ids):
        return "".join(chr(96 + i) for i in ids)  # 1 -> "a", 2 -> "b", ...

    def settle(path, cap=10, stop=()):
        return settled(path, text, max_new_tokens=cap, eos=frozenset({0}), stop=stop)

    assert settle([1, 2, 0, 3]) == ([1, 2], True)
    assert settle([1, 2, 3], cap=2) == ([1, 2], True)
    assert settle([1, 2, 3], stop=("b",)) == ([1, 2, 3], True)
    assert settle([1, 2, 3], stop=("z",)) == ([1, 2, 3], False)
    assert settle([]) == ([], False)


def test_the_memo_keeps_the_longest_path_and_forgets_the_oldest_context():
    memo = GreedyPaths(capacity=2)
    memo.record([1], [7, 8])
    memo.record([1], [7])
    assert memo.lookup([1]) == (7, 8)
    memo.record([2], [9])
    memo.record([3], [9])
    assert memo.lookup([1]) == () and len(memo) == 2


def test_scoring_shows_the_greedy_path_of_model_generate(lm):
    """Against `model.generate`: a continuation that is the greedy answer shows it and the token
    after it; one that leaves it at token 2 shows the two tokens and the model's pick there."""
    vocab = lm.model.config.vocab_size
    pairs, expected = [], []
    for prompt in FEW_SHOT:
        context = hf_generate.tokenize(lm.tokenizer, [prompt])[0]
        greedy = reference_ids(lm, prompt, 7)
        assert len(greedy) == 7, "the tiny model emits no EOS this early"
        pairs.append((context, greedy[:6]))
        expected.append(greedy[:7])
        wrong = (greedy[2] + 1) % vocab
        pairs.append((context, greedy[:2] + [wrong, greedy[3]]))
        expected.append(greedy[:3])
    picks: list[list[int]] = []
    with_picks = lm.scorer.score(pairs, picks=picks)
    got = [path_of(cont, p) for (_, cont), p in zip(pairs, picks, strict=True)]
    assert got == expected
    # Feeding the last token changes no score.
    plain = lm.scorer.score(pairs)
    assert (with_picks - plain).abs().max().item() < 1e-5


def test_generation_after_recorded_paths_gives_the_plain_greedy_texts(lm):
    settings = dict(max_new_tokens=8, stop=["\n", "zz"])
    plain = lm.generate(PROMPTS, **settings)
    answers = [samples[0] for samples in plain]
    # Half the rows score their own greedy answer, the other half a wrong one.
    requests = [
        (prompt, " " + (answer if k % 2 else "wrong answer"))
        for k, (prompt, answer) in enumerate(zip(PROMPTS, answers, strict=True))
    ]
    with lm.recording_greedy_paths():
        lm.loglikelihood(requests)
    assert len(lm.greedy_paths) == len(PROMPTS)
    assert lm.generate(PROMPTS, **settings) == plain
    assert lm.greedy_paths.hits >= len(PROMPTS)


def test_a_path_that_reaches_the_cap_decodes_nothing(lm):
    cap = 5
    contexts = hf_generate.tokenize(lm.tokenizer, FEW_SHOT)
    greedy = [reference_ids(lm, prompt, cap + 1) for prompt in FEW_SHOT]
    picks: list[list[int]] = []
    lm.scorer.score([(c, g[:cap]) for c, g in zip(contexts, greedy, strict=True)], picks=picks)
    for context, p, g in zip(contexts, picks, greedy, strict=True):
        lm.greedy_paths.record(context, path_of(g[:cap], p))
    with Recorder(lm.model) as passes:
        texts = lm.generate(FEW_SHOT, max_new_tokens=cap)
    assert passes.shapes == []
    expected = [[lm.tokenizer.decode(g[:cap], skip_special_tokens=True)] for g in greedy]
    assert texts == expected


def test_sampling_ignores_recorded_paths(lm):
    with lm.recording_greedy_paths():
        lm.loglikelihood([(p, " x y z") for p in FEW_SHOT])
    before = lm.greedy_paths.hits
    lm.generate(FEW_SHOT, n=2, temperature=1.0, max_new_tokens=3, seed=0)
    assert lm.greedy_paths.hits == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_greedy_paths_on_cuda(tiny_lm):
    lm = HFLanguageModel(copy.deepcopy(tiny_lm.model).to("cuda"), tiny_lm.tokenizer, name="tiny")
    settings = dict(max_new_tokens=8, stop=["\n"])
    plain = lm.generate(PROMPTS, **settings)
    with lm.recording_greedy_paths():
        lm.loglikelihood([(p, " " + a[0]) for p, a in zip(PROMPTS, plain, strict=True)])
    assert lm.generate(PROMPTS, **settings) == plain
    assert lm.greedy_paths.hits >= len(PROMPTS)
