"""Drafts from a row's own text (ape/prompt_lookup.py) and their check in the decoding loop
(ape/decoding.py): the same tokens as plain decoding, in fewer passes when drafts are right."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import ape.decoding as decoding
import ape.hf_generate as hf_generate
from ape.decoding import Sampling
from ape.prompt_lookup import draft
from ape.shared_generation import generate_tokens

PROMPTS = [
    "Write the opposite word.\n\nInput: hot\nOutput: cold\n\nInput: big\nOutput:",
    "Write the opposite word.\n\nInput: hot\nOutput: cold\n\nInput: fast\nOutput:",
    "The capital of France is",
]


def test_draft_continues_the_latest_earlier_occurrence_of_the_tail():
    text = [1, 2, 3, 9, 1, 2, 4, 5, 6, 1, 2]
    # The tail (1, 2) last occurred before 4 5 6; the longest tail found wins.
    assert draft(text, generated=1, length=3) == [4, 5, 6]
    assert draft(text, generated=1, length=10) == [4, 5, 6, 1, 2]
    assert draft([7, 8, 9, 7, 8, 5, 3, 8], generated=1, length=2) == [5, 3]  # only 8 recurs
    assert draft([5, 6, 7, 8], generated=1, length=4) == []  # the tail never occurred before
    assert draft(text, generated=0, length=3) == []  # the prompt's own tail: no draft
    assert draft(text, generated=2, length=0) == []


def counted(model, tokenizer, prompts, sampling, n=1) -> tuple[list, int]:
    """The generated tokens and the decoder passes it took."""
    passes = []
    handle = model.base_model.register_forward_pre_hook(lambda *_: passes.append(1))
    try:
        out = generate_tokens(model, tokenizer, prompts, sampling, n=n)
    finally:
        handle.remove()
    return out, len(passes)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_right_drafts_save_passes_and_wrong_ones_change_nothing(
    tiny_lm, single_thread, monkeypatch, temperature
):
    """An oracle that drafts the plain run's own next tokens: the same texts in fewer passes;
    one that drafts wrong tokens: the same texts, as many steps."""
    model, tokenizer = tiny_lm.model, tiny_lm.tokenizer
    prompts = hf_generate.tokenize(tokenizer, PROMPTS)
    eos = hf_generate.eos_ids(model, tokenizer)
    plain = Sampling(temperature=temperature, seed=4, max_new_tokens=16, eos=eos)
    expected, plain_passes = counted(model, tokenizer, prompts, plain, n=2)
    answers = {tuple(p): [s for s in expected[i]] for i, p in enumerate(prompts)}

    def oracle(text, generated, length, wrong=False):
        prompt, new = tuple(text[: len(text) - generated]), list(text[len(text) - generated :])
        for sample in answers[prompt]:  # the sample this row is writing
            if sample[:generated] == new:
                guess = sample[generated : generated + length]
                return [t + 1 for t in guess] if wrong else guess
        raise AssertionError("no sample starts so")

    looked_up = dataclasses.replace(plain, lookup=5)
    monkeypatch.setattr(decoding, "draft", oracle)
    got, passes = counted(model, tokenizer, prompts, looked_up, n=2)
    assert got == expected
    assert passes < plain_passes / 2
    monkeypatch.setattr(decoding, "draft", lambda *a: oracle(*a, wrong=True))
    got, passes = counted(model, tokenizer, prompts, looked_up, n=2)
    assert got == expected
    assert passes == plain_passes


def test_stops_and_the_token_cap_hold_inside_a_draft(tiny_lm, single_thread, monkeypatch):
    model, tokenizer = tiny_lm.model, tiny_lm.tokenizer
    prompts = hf_generate.tokenize(tokenizer, PROMPTS)
    eos = hf_generate.eos_ids(model, tokenizer)
    free = generate_tokens(model, tokenizer, prompts, Sampling(max_new_tokens=12, eos=eos))
    # A stop at the text of each row's 4th token, and a cap of 7: both fall inside drafts.
    stops = tuple(tokenizer.decode(row[0][3:4]) for row in free)
    answers = {tuple(p): row[0] for p, row in zip(prompts, free, strict=True)}

    def oracle(text, generated, length):
        for prompt, answer in answers.items():
            if tuple(text[: len(prompt)]) == prompt and len(text) == len(prompt) + generated:
                return answer[generated : generated + length]
        raise AssertionError("unknown row")

    monkeypatch.setattr(decoding, "draft", oracle)
    for sampling in (
        Sampling(max_new_tokens=12, eos=eos, stop=stops),
        Sampling(max_new_tokens=7, eos=eos),
    ):
        plain = generate_tokens(model, tokenizer, prompts, sampling)
        drafted = dataclasses.replace(sampling, lookup=6)
        assert generate_tokens(model, tokenizer, prompts, drafted) == plain


def test_a_copying_answer_takes_fewer_passes_on_the_embedded_model(single_thread):
    from ape.models import load_model

    lm = load_model()
    pairs = [("The sky is blue.", "The sky is not blue."), ("Cats can fly.", "Cats cannot fly.")]
    pairs.append(("Water is dry.", "Water is not dry."))
    demos = "".join(f"Input: {a}\nOutput: {b}\n\n" for a, b in pairs)
    prompt = demos + "Input: Paris is the capital of France.\nOutput:"
    tokens = hf_generate.tokenize(lm.tokenizer, [prompt])
    sampling = Sampling(max_new_tokens=16, eos=hf_generate.eos_ids(lm.model, lm.tokenizer))
    plain, plain_passes = counted(lm.model, lm.tokenizer, tokens, sampling)
    drafted, passes = counted(
        lm.model, lm.tokenizer, tokens, dataclasses.replace(sampling, lookup=8)
    )
    assert drafted == plain
    # The answer, then the next demo: both copy the prompt.
    assert lm.tokenizer.decode(plain[0][0]).startswith(" Paris is not")
    assert passes < plain_passes / 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_drafts_on_cuda(tiny_lm):
    model = copy.deepcopy(tiny_lm.model).to("cuda")
    prompts = hf_generate.tokenize(tiny_lm.tokenizer, PROMPTS)
    sampling = Sampling(max_new_tokens=12, eos=hf_generate.eos_ids(model, tiny_lm.tokenizer))
    plain = generate_tokens(model, tiny_lm.tokenizer, prompts, sampling)
    drafted = dataclasses.replace(sampling, lookup=6)
    assert generate_tokens(model, tiny_lm.tokenizer, prompts, drafted) == plain
