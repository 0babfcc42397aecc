"""Prefix tuning and P-tuning: the key/value prefix scored exactly, trained, refused where it
cannot go; P-tuning's encoders. And how every soft run starts and ends: the text init (step 0 is
the text prompt), label-balanced batches, selection that keeps the start."""

from __future__ import annotations

import copy
import json
from collections import Counter

import numpy as np
import pytest
import torch
import transformers
from ape.search.soft.init import (
    DEFAULT_TOKENS,
    FREQUENT_TOKENS,
    initial_kv,
    initial_vectors,
    instruction_tokens,
)
from ape.search.soft.prompt import SoftPrompt, nearest_tokens
from ape.search.soft.training import balanced_batches
from test_soft_prompt import REQUESTS, TOL, _sentiment_task, soft_run

import ape
import ape.kv_cache as kv_cache
from ape.lm import HFLanguageModel
from ape.prompt import Prompt, VectorPrefix
from ape.result import Result


def random_kv(lm: HFLanguageModel, n: int = 5, seed: int = 0) -> torch.Tensor:
    layers, heads, dim = kv_cache.kv_shape(lm.model)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(layers, 2, heads, n, dim, generator=generator)


def plain_forward(lm: HFLanguageModel, requests, kv: torch.Tensor) -> np.ndarray:
    """One unbatched forward pass per request with `kv` as its past key/values (positions start
    at n, as transformers and PEFT place the input after a cache)."""
    out = []
    with torch.inference_mode():
        for context, continuation in lm.encode_pairs(requests):
            cache = kv_cache.build_cache(
                lm.model.config, [(k[None], v[None]) for k, v in kv.to(lm.model.dtype)]
            )
            ids = torch.tensor([context + continuation])
            logits = kv_cache.run(lm.model, cache=cache, input_ids=ids)[0].logits[0].float()
            logprobs = logits[len(context) - 1 : -1].log_softmax(-1)
            out.append(float(logprobs[torch.arange(len(continuation)), continuation].sum()))
    return np.array(out)


@pytest.mark.parametrize("budgets", ["default", "small"])
def test_kv_prefix_matches_a_plain_forward_with_the_same_past_key_values(tiny_lm, budgets):
    lm = copy.copy(tiny_lm)
    if budgets == "small":  # many batches, packs and prefix groups
        lm.max_batch_tokens, lm.pack_tokens = 48, 16
    kv = random_kv(lm)
    fast = lm.loglikelihood(REQUESTS, soft_prefix=kv)
    np.testing.assert_allclose(fast, plain_forward(lm, REQUESTS, kv), atol=TOL, rtol=0)
    assert np.abs(fast - lm.loglikelihood(REQUESTS)).max() > 1e-3  # the prefix is used


def test_a_text_kv_prefix_scores_as_the_text_prompt(tiny_lm):
    """Step 0 of prefix tuning is the instruction's own keys and values: exactly the text prompt
    (the input after them starts at position n, as after the text)."""
    text = "Write a word that means the opposite of the input word."
    table = tiny_lm.model.get_input_embeddings().weight.detach()
    kv = initial_kv(tiny_lm, table[instruction_tokens(tiny_lm, text)])
    template, prompt = Prompt(""), Prompt(text)
    inputs = ["hot", "up", "early"]
    after_kv = tiny_lm.loglikelihood(
        [(template.context(x), " cold") for x in inputs], soft_prefix=kv
    )
    as_text = tiny_lm.loglikelihood([(prompt.context(x), " cold") for x in inputs])
    np.testing.assert_allclose(after_kv, as_text, atol=TOL, rtol=0)


def test_gradients_reach_the_kv_prefix(tiny_lm):
    """Autograd against a central finite difference along a random direction (float64 model).

    The scorer projects to the vocabulary in float32, so the prefix is made large (keys and
    values of spread 5) for the tiny model to listen to it well above float32 rounding."""
    model = copy.deepcopy(tiny_lm.model).double().requires_grad_(False)
    lm = HFLanguageModel(model, tiny_lm.tokenizer, name="tiny64")
    kv, direction = 5 * random_kv(lm).double(), 5 * random_kv(lm, seed=1).double()
    trained = kv.clone().requires_grad_(True)
    lm.loglikelihood_tensor(REQUESTS, soft_prefix=trained)[0].sum().backward()
    eps = 1e-2
    with torch.no_grad():
        up = lm.loglikelihood_tensor(REQUESTS, soft_prefix=kv + eps * direction)[0].sum()
        down = lm.loglikelihood_tensor(REQUESTS, soft_prefix=kv - eps * direction)[0].sum()
    numeric = float(up - down) / (2 * eps)
    analytic = float((trained.grad * direction).sum())
    assert abs(numeric - analytic) <= 1e-5 + 0.02 * abs(numeric)
    assert abs(analytic) > 1e-2


def _optimize(tiny_lm, **options):
    defaults = dict(steps=4, eval_every=2, batch_size=4, lr=0.05, seed=3)
    return soft_run(
        tiny_lm,
        **{**defaults, **options},
    )


@pytest.mark.parametrize("encoder", ["none", "mlp"])
def test_prefix_mode_trains_a_kv_prefix_from_the_text(tiny_lm, tmp_path, single_thread, encoder):
    result = _optimize(tiny_lm, mode="prefix", encoder=encoder, init_text="Is it good or bad?")
    extras = result.extras["soft_prompt"]
    start = next(e for e in result.leaderboard if e.origin == "soft: initial prompt")
    text_score = ape.evaluate(
        _sentiment_task(), ["Is it good or bad?"], model=tiny_lm, evaluator="choice", split="val"
    )[0]
    assert start.val_score == pytest.approx(text_score)  # step 0 is the text prompt
    assert [c["step"] for c in extras["checkpoints"]] == [0, 2, 4]
    assert len({c["label"] for c in extras["checkpoints"]}) == 3  # the prefix moved
    soft = result.artifacts["soft_prompt"]
    layers, heads, dim = kv_cache.kv_shape(tiny_lm.model)
    n = len(instruction_tokens(tiny_lm, "Is it good or bad?"))
    assert soft.kind == "kv" and soft.vectors.shape == (layers, 2, heads, n, dim)
    assert "key/value vectors per layer" in soft.label and "projection" not in extras
    path = result.save(tmp_path / "run.json")
    loaded = SoftPrompt.load(ape.Result.load(path).file("soft_prompt", path))
    assert loaded.label == soft.label and loaded.kind == "kv"  # only the keys and values


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_ptuning_encoders_write_the_vectors(tiny_lm, single_thread, encoder):
    result = _optimize(tiny_lm, mode="ptuning", encoder=encoder, encoder_hidden=16, lr=0.01)
    extras = result.extras["soft_prompt"]
    assert extras["encoder"] == encoder and extras["mode"] == "ptuning"
    assert len({c["label"] for c in extras["checkpoints"]}) == 3  # the encoder output moved
    soft = result.artifacts["soft_prompt"]
    assert soft.kind == "embeddings" and soft.info["encoder"] == encoder


def test_same_seed_same_prefix(tiny_lm, single_thread):
    def label(seed: int) -> str:
        result = _optimize(tiny_lm, mode="prefix", encoder="mlp", seed=seed, init="random")
        return result.extras["soft_prompt"]["checkpoints"][-1]["label"]

    assert label(5) == label(5)
    assert label(5) != label(6)


def test_a_ruinous_learning_rate_keeps_the_initial_prompt(tiny_lm, single_thread):
    """Training that raises the validation loss never replaces the starting prompt."""
    result = _optimize(tiny_lm, mode="prefix", lr=500.0, init_text="Is it good or bad?")
    extras = result.extras["soft_prompt"]
    assert extras["kept_start"] and extras["best_step"] == 0
    assert result.artifacts["soft_prompt"].label == extras["start_label"]
    assert result.best.origin == "soft: initial prompt"


def test_batches_are_label_balanced_and_seeded():
    rows = _sentiment_task().train + _sentiment_task().val
    rows = [r for r in rows if r.output == "positive"][:3] + [
        r for r in rows if r.output == "negative"
    ]
    draw = balanced_batches(rows, 4, np.random.default_rng(0), balance=True)
    batches = [next(draw) for _ in range(6)]
    assert all(Counter(e.output for e in b) == {"positive": 2, "negative": 2} for b in batches)
    again = balanced_batches(rows, 4, np.random.default_rng(0), balance=True)
    assert [next(again) for _ in range(6)] == batches
    plain = balanced_batches(rows, 4, np.random.default_rng(0), balance=False)
    assert sum(len(next(plain)) for _ in range((len(rows) + 3) // 4)) == len(rows)


def test_prefix_mode_on_an_unsupported_cache_layout_is_one_line(tiny_lm):
    config = transformers.Qwen2Config(
        vocab_size=len(tiny_lm.tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
    )
    windowed = HFLanguageModel(
        transformers.Qwen2ForCausalLM(config).eval(), tiny_lm.tokenizer, name="windowed"
    )
    with pytest.raises(ValueError) as err:
        _optimize(windowed, mode="prefix")
    assert str(err.value) == (
        "--mode prefix: Qwen2ForCausalLM has sliding_attention layers; a key/value prefix needs "
        "a decoder whose every layer caches keys and values of one shape "
        "[kv_heads, tokens, head_dim]"
    )


def test_a_kv_prefix_for_another_model_is_refused_in_one_line(tiny_lm):
    layers, heads, dim = kv_cache.kv_shape(tiny_lm.model)
    other = SoftPrompt(torch.zeros(layers + 1, 2, heads, 3, dim), "bigger")
    with pytest.raises(ValueError) as err:
        ape.evaluate(_sentiment_task(), [other.prompt()], model=tiny_lm, evaluator="choice")
    assert str(err.value) == (
        f"the key/value prefix has {layers + 1} layers x {heads} KV heads x {dim} dims (made for "
        f"model 'bigger'); model 'tiny' has {layers} x {heads} x {dim}"
    )
    with pytest.raises(ValueError, match="made for model 'bigger'"):
        other.export_peft("unused", tiny_lm)


def test_kv_labels_come_back_as_kv_prefixes(tiny_lm):
    soft = SoftPrompt(random_kv(tiny_lm, n=3), "tiny")
    assert soft.label == f"<soft prompt: 3 key/value vectors per layer {soft.digest}>"
    named = VectorPrefix.named(soft.label)
    assert named == soft.prefix and named.kind == "kv" and not named.loaded
    assert Prompt.from_text(soft.label).render("cat") == "Input: cat\nOutput:"
    with pytest.raises(ValueError, match="keys and values, got"):
        VectorPrefix.of(torch.zeros(2, 2, 2))


def test_init_options(tiny_lm):
    generator = torch.Generator().manual_seed(0)
    table = tiny_lm.model.get_input_embeddings().weight.detach()
    # 'text' starts as the instruction's tokens as the template renders them, in context.
    rendered = tiny_lm.tokenizer(Prompt("great movie").context("x"), add_special_tokens=False)
    template = tiny_lm.tokenizer(Prompt("").context("x"), add_special_tokens=False)
    words = rendered["input_ids"][: -len(template["input_ids"])]
    assert tiny_lm.tokenizer.decode(words).startswith("Instruction: great movie")
    vectors, ids = initial_vectors(tiny_lm, "text", 0, "great movie", generator)
    assert ids == words and torch.equal(vectors, table[ids])  # n = 0: the text's own length
    _, ids = initial_vectors(tiny_lm, "text", 2 * len(words) + 1, "great movie", generator)
    assert ids == (words * 3)[: 2 * len(words) + 1]  # tiled
    _, ids = initial_vectors(tiny_lm, "text", 1, "great movie", generator)
    assert ids == words[:1]  # trimmed
    _, ids = initial_vectors(tiny_lm, "vocab", 50, "", generator)
    special = set(tiny_lm.tokenizer.all_special_ids)
    assert all(i not in special and i < FREQUENT_TOKENS + len(special) for i in ids)
    vectors, ids = initial_vectors(tiny_lm, "random", 3, "", generator)
    assert ids == [] and vectors.shape == (3, table.shape[1])
    assert initial_vectors(tiny_lm, "random", 0, "", generator)[0].shape[0] == DEFAULT_TOKENS
    assert nearest_tokens(table[[100, 2000, 40000]], tiny_lm) == [100, 2000, 40000]


def test_step_zero_of_a_text_init_is_the_text_prompt(tiny_lm, single_thread):
    """Untrained vectors from --init-text score exactly as that instruction does."""
    from ape.prefix import PrefixedModel

    task, text = _sentiment_task(), "Is the day good or bad?"
    result = soft_run(
        tiny_lm,
        task=task,
        init_text=text,
        steps=1,
    )
    entry = next(e for e in result.leaderboard if e.origin == "soft: initial prompt")
    as_text = ape.evaluate(task, [text], model=tiny_lm, evaluator="choice", split="val")[0]
    assert entry.val_score == pytest.approx(as_text)
    table = tiny_lm.model.get_input_embeddings().weight.detach()
    start = SoftPrompt(table[result.extras["soft_prompt"]["init_tokens"]], "tiny")
    assert start.label == entry.instruction
    evaluator = ape.evaluation.make_evaluator("choice", task)
    ours = evaluator.label_logprobs(
        PrefixedModel(tiny_lm, start.prefix), [start.prompt()], task.val
    )
    theirs = evaluator.label_logprobs(tiny_lm, [Prompt(text)], task.val)
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)


def test_searcher_records_checkpoints_and_saves_the_best(tiny_lm, tmp_path, single_thread):
    task = _sentiment_task()
    result = soft_run(
        tiny_lm,
        task=task,
        seed=3,
        n_tokens=4,
        lr=0.05,
        steps=6,
        batch_size=4,
        eval_every=2,
        patience=10,
        init="vocab",
    )
    extras = result.extras["soft_prompt"]
    assert [c["step"] for c in extras["checkpoints"]] == [0, 2, 4, 6]
    assert len(extras["training_curve"]) == 6
    # The lowest validation loss (the first of ties) is the one checkpoint held to the start;
    # it is a candidate only if it passed that test.
    losses = [(c["val_loss"], c["step"]) for c in extras["checkpoints"]]
    picked = min(losses)[1]
    entries = {e.origin: e for e in result.leaderboard}
    start = entries["soft: initial prompt"]
    assert start.instruction == extras["start_label"]
    trained = [o for o in entries if o.startswith("soft step")]
    accepted = picked and extras["acceptance"]["accepted"]
    assert trained == ([f"soft step {picked}"] if accepted else [])
    if picked:
        assert extras["acceptance"]["step"] == picked
    projection = extras["projection"]
    scored = 1 + (projection["val_score"] is not None) + (picked > 0)
    # 6 steps of 4 training examples, 4 validation losses, the start, the projection and the
    # acceptance test's pass on the 8 val rows (a checkpoint that passes is scored by then).
    assert result.budget_used == 6 * 4 + 4 * len(task.val) + scored * len(task.val)
    soft = result.artifacts["soft_prompt"]
    assert soft.label == extras["best_label"]
    assert soft.label == (trained and entries[trained[0]].instruction or start.instruction)
    entry = entries[trained[0]] if trained else start
    assert projection["token_ids"] == nearest_tokens(soft.vectors, tiny_lm)
    if projection["val_score"] is not None:
        assert any(e.instruction == projection["text"] for e in result.leaderboard)

    path = result.save(tmp_path / "run.json")
    folder = Result.load(path).file("soft_prompt", path)
    assert folder == tmp_path / "run.files" / "soft_prompt"
    loaded = SoftPrompt.load(folder)
    assert loaded.label == soft.label and torch.equal(loaded.vectors, soft.vectors)
    assert (
        json.loads((folder / "soft_prompt.json").read_text())["info"]["step"] == soft.info["step"]
    )
    # The saved vectors score as the run scored them.
    again = ape.evaluate(task, [loaded.prompt()], model=tiny_lm, evaluator="choice", split="val")
    assert again[0] == pytest.approx(entry.val_score)
