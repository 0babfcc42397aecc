"""Soft prompts: exact scoring through the prefix cache, gradients, the searcher, files, PEFT."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from ape.search.soft.prompt import SoftPrompt, nearest_tokens

import ape
from ape.lm import HFLanguageModel
from ape.prompt import Prompt
from ape.reference import reference_loglikelihood
from ape.result import Result
from ape.task import Example, Task

TOL = 1e-4
INSTRUCTION = "Instruction: Write a word that means the opposite of the input word."
REQUESTS = [
    *(
        (f"{INSTRUCTION}\n\nInput: {x}\nOutput:", f" {y}")
        for x, y in [("hot", "cold"), ("up", "down"), ("early", "late"), ("open", "shut")]
    ),
    ("The capital of France is", " Paris"),
    ("2 + 2 =", " 4"),
    ("x", " y z w"),
    ("", " hello"),  # empty context: the conditioning token follows the soft prefix
]


def soft_vectors(lm: HFLanguageModel, n: int = 5, seed: int = 0) -> torch.Tensor:
    width = lm.model.get_input_embeddings().weight.shape[1]
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.fixture
def small_batches(tiny_lm) -> HFLanguageModel:
    """tiny_lm with tiny batch and pack budgets: many batches, packs and prefix groups."""
    lm = copy.copy(tiny_lm)
    lm.max_batch_tokens, lm.pack_tokens = 48, 16
    return lm


@pytest.mark.parametrize("budgets", ["default", "small"])
def test_soft_prefix_scores_match_one_plain_forward_pass(tiny_lm, small_batches, budgets):
    lm = tiny_lm if budgets == "default" else small_batches
    soft = soft_vectors(lm)
    fast = lm.loglikelihood(REQUESTS, soft_prefix=soft)
    slow = reference_loglikelihood(lm, REQUESTS, soft_prefix=soft)
    np.testing.assert_allclose(fast, slow, atol=TOL, rtol=0)
    # The vectors are really used, and the text-only path is unchanged.
    plain = lm.loglikelihood(REQUESTS)
    assert np.abs(plain - fast).max() > 1e-3
    np.testing.assert_allclose(plain, reference_loglikelihood(lm, REQUESTS), atol=TOL, rtol=0)


def test_the_instruction_prefix_is_shared_after_the_soft_prefix(tiny_lm):
    """The four requests with one instruction form a prefix group whose KV runs after the soft
    prefix: scores must not depend on how requests are grouped."""
    soft = soft_vectors(tiny_lm)
    together = tiny_lm.loglikelihood(REQUESTS[:4], soft_prefix=soft)
    alone = [tiny_lm.loglikelihood([r], soft_prefix=soft)[0] for r in REQUESTS[:4]]
    np.testing.assert_allclose(together, alone, atol=TOL, rtol=0)


def test_gradients_reach_the_soft_prefix(tiny_lm):
    """The autograd gradient matches a central finite difference along a random direction.

    The model runs in float64, but the scorer projects to the vocabulary in float32, so the step
    is large enough for float32 rounding to stay small against the difference.
    """
    model = copy.deepcopy(tiny_lm.model).double().requires_grad_(False)
    lm = HFLanguageModel(model, tiny_lm.tokenizer, name="tiny64")
    soft = soft_vectors(lm).double()
    direction = soft_vectors(lm, seed=1).double()
    vectors = soft.clone().requires_grad_(True)
    sums, _ = lm.loglikelihood_tensor(REQUESTS, soft_prefix=vectors)
    sums.sum().backward()
    eps = 1e-2
    with torch.no_grad():
        up = lm.loglikelihood_tensor(REQUESTS, soft_prefix=soft + eps * direction)[0].sum()
        down = lm.loglikelihood_tensor(REQUESTS, soft_prefix=soft - eps * direction)[0].sum()
    numeric = float(up - down) / (2 * eps)
    analytic = float((vectors.grad * direction).sum())
    assert abs(numeric - analytic) <= 1e-5 + 0.02 * abs(numeric)
    assert abs(analytic) > 1e-6


def test_training_steps_lower_the_choice_loss(tiny_lm):
    task = _sentiment_task()
    evaluator = ape.evaluation.make_evaluator("choice", task)
    loss = evaluator.training_loss(tiny_lm, Prompt(""), task.train)
    vectors = torch.nn.Parameter(soft_vectors(tiny_lm, n=4))
    optimizer = torch.optim.AdamW([vectors], lr=0.1, weight_decay=0.0)
    tiny_lm.model.requires_grad_(False)
    try:
        losses = []
        for _ in range(15):
            value = loss(vectors, task.train)
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
            losses.append(value.item())
    finally:
        tiny_lm.model.requires_grad_(True)
    # A random tiny model barely listens to its prefix, so the loss moves little; a wrong
    # gradient (sign or path) would raise it.
    assert losses[-1] < losses[0] - 2e-4


def test_a_soft_label_renders_as_the_template_and_needs_its_vectors(tiny_lm):
    soft = SoftPrompt(soft_vectors(tiny_lm), "tiny")
    prompt = soft.prompt()
    assert prompt.instruction == soft.label == f"<soft prompt: 5 vectors {soft.digest}>"
    assert prompt.context("cat") == Prompt("").context("cat") == "Input: cat\nOutput:"
    assert prompt == Prompt(soft.label)  # identity is the label (a digest of the vectors)
    task = _sentiment_task()
    with pytest.raises(ValueError, match="vectors are not loaded"):
        ape.evaluate(task, [soft.label], model=tiny_lm, evaluator="choice", split="val")
    text, scored = ape.evaluate(task, ["", prompt], model=tiny_lm, evaluator="choice", split="val")
    assert 0 <= text <= 1 and 0 <= scored <= 1


def test_same_seed_same_soft_prompt(tiny_lm, single_thread):
    def run(seed: int) -> str:
        result = soft_run(
            tiny_lm,
            evaluator="loglik",
            test_top=1,
            seed=seed,
            init="random",
            n_tokens=3,
            steps=2,
            eval_every=1,
        )
        return result.artifacts["soft_prompt"].label

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_pez_checkpoints_are_token_sequences(tiny_lm, single_thread):
    result = soft_run(
        tiny_lm,
        mode="pez",
        init="random",
        n_tokens=4,
        lr=0.05,
        steps=3,
        eval_every=1,
    )
    soft = result.artifacts["soft_prompt"]
    table = tiny_lm.model.get_input_embeddings().weight.detach()
    ids = nearest_tokens(soft.vectors, tiny_lm)
    assert torch.equal(soft.vectors, table[ids])  # exactly the tokens' embeddings
    assert result.extras["soft_prompt"]["projection"]["token_ids"] == ids


def test_budget_stops_training_and_keeps_the_best(tiny_lm, single_thread):
    task = _sentiment_task()
    result = soft_run(
        tiny_lm,
        task=task,
        budget=30,
        steps=50,
        batch_size=4,
        eval_every=2,
        n_tokens=2,
        init="random",
    )
    assert result.stopped_by_budget
    assert result.budget_used <= 30
    assert "soft_prompt" in result.artifacts


def test_cli_evaluate_scores_a_saved_soft_prompt(tiny_lm, tiny_model_dir, tmp_path, capsys):
    from ape.cli import main

    soft = SoftPrompt(soft_vectors(tiny_lm), "tiny")
    soft.save(tmp_path / "soft")
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"input": e.input, "output": e.output}) + "\n" for e in _examples())
    )
    code = main(
        [
            "evaluate",
            str(data),
            "--model",
            str(tiny_model_dir),
            "--evaluator",
            "choice",
            "--instruction",
            "",
            "--soft-prompt",
            str(tmp_path / "soft"),
        ]
    )
    assert code == 0
    assert soft.label in capsys.readouterr().out


def test_a_soft_prompt_for_another_width_is_refused(tiny_lm):
    wrong = SoftPrompt(torch.zeros(2, 7), "other")
    with pytest.raises(ValueError, match="7-dim vectors"):
        ape.evaluate(_sentiment_task(), [wrong.prompt()], model=tiny_lm, evaluator="choice")


@pytest.mark.slow
def test_embedded_model_soft_prefix_is_exact():
    lm = ape.load_model()
    table = lm.model.get_input_embeddings().weight.detach()
    soft = table[[1000, 2000, 3000, 4000]] + 0.01 * soft_vectors(lm, n=4)
    fast = lm.loglikelihood(REQUESTS, soft_prefix=soft)
    slow = reference_loglikelihood(lm, REQUESTS, soft_prefix=soft)
    np.testing.assert_allclose(fast, slow, atol=TOL, rtol=0)


def _examples() -> list[Example]:
    good = "great fine lovely superb happy nice warm bright sunny sweet".split()
    bad = "awful bad gloomy nasty sad grim cold dark rainy sour".split()
    rows = [Example(f"a {w} day", "positive") for w in good]
    rows += [Example(f"a {w} day", "negative") for w in bad]
    return rows


def soft_run(tiny_lm, task: Task | None = None, **options):
    """`ape.optimize` with the soft searcher, quietly: the sentiment task, `choice` by default."""
    options.setdefault("evaluator", "choice")
    task = task or _sentiment_task()
    return ape.optimize(task, model=tiny_lm, searcher="soft", progress=False, **options)


def _sentiment_task() -> Task:
    rows = _examples()
    order = np.random.default_rng(0).permutation(len(rows))
    rows = [rows[i] for i in order]
    return Task(
        name="tiny-sentiment",
        train=rows[:8],
        val=rows[8:16],
        test=rows[16:],
        labels=["negative", "positive"],
        verbalizers={"negative": "bad", "positive": "good"},
    )


def test_default_init_text_names_the_label_words(tiny_lm, single_thread):
    result = soft_run(
        tiny_lm,
        steps=1,
        n_tokens=2,
    )
    assert result.extras["soft_prompt"]["init_text"] == "Answer with one word: bad or good."


def test_cli_optimize_with_the_soft_searcher(tiny_model_dir, tmp_path, capsys, single_thread):
    from ape.cli import main

    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"input": e.input, "output": e.output}) + "\n" for e in _examples())
    )
    out = tmp_path / "run.json"
    code = main(
        [
            "optimize",
            str(data),
            "--model",
            str(tiny_model_dir),
            "--searcher",
            "soft",
            "--evaluator",
            "choice",
            "--steps",
            "2",
            "--eval-every",
            "1",
            "--n-tokens",
            "3",
            "--init",
            "random",
            "--storage",
            "memory",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "<soft prompt: 3 vectors" in printed and "soft: nearest tokens" in printed
    folder = Result.load(out).file("soft_prompt", out)
    assert f"--soft-prompt {folder}" in printed
    assert SoftPrompt.load(folder).n == 3


def test_a_prompt_kept_as_text_comes_back_as_an_unloaded_prefix(tiny_lm):
    from ape.result import Entry
    from ape.study import prompt_from_json, prompt_to_json

    soft = SoftPrompt(soft_vectors(tiny_lm), "tiny")
    stored = prompt_from_json(prompt_to_json(soft.prompt()))
    assert stored == soft.prompt() and stored.key() == soft.prompt().key()
    assert stored.prefix == soft.prefix and soft.prefix.loaded and not stored.prefix.loaded
    assert stored.render("cat") == soft.prompt().render("cat") == "Input: cat\nOutput:"
    entry = Entry.of(soft.prompt(), val_score=0.5, val_examples=1)
    assert entry.render("cat") == "Input: cat\nOutput:"  # as `Result.best.render` gives it
    assert Prompt.from_text("Be brief.").prefix is None
    assert (
        Prompt.from_text("Be brief.").render("cat")
        == "Instruction: Be brief.\n\nInput: cat\nOutput:"
    )
    with pytest.raises(ValueError, match="named by its label"):
        Prompt("Be brief.", prefix=soft.prefix)


def test_a_resumed_soft_run_replays_its_checkpoints(tiny_lm, tmp_path, single_thread):
    storage = f"sqlite:///{tmp_path / 'soft.db'}"

    def run():
        return soft_run(
            tiny_lm,
            storage=storage,
            init="random",
            n_tokens=2,
            steps=2,
            eval_every=1,
        )

    first, again = run(), run()
    assert first.budget_detail["pairs_computed"] > 0
    assert again.budget_detail["pairs_computed"] == 0  # the same vectors: their scores replayed
    assert [(e.instruction, e.val_score) for e in again.leaderboard] == [
        (e.instruction, e.val_score) for e in first.leaderboard
    ]


def test_soft_with_the_generation_evaluator_is_refused_before_the_model_loads(task_file):
    with pytest.raises(ValueError) as err:
        ape.optimize(task_file, model="no/such-model", searcher="soft", evaluator="generation")
    assert str(err.value) == (
        "searcher 'soft' needs an evaluator with a training loss; 'generation' offers none "
        "(use --evaluator choice, loglik or loglik_sum)"
    )
