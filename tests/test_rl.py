"""The RL prompt searcher: rewards, the policy, budget, trials, determinism, saving, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ape.search.base import get_searcher
from ape.search.rl.policy import PromptPolicy, load_policy
from ape.search.rl.reward import label_margin, zscore

import ape
from ape.cli import main
from ape.evaluation import make_evaluator
from ape.objective import BudgetExhausted, Objective
from ape.prompt import Prompt
from ape.result import Result
from ape.study import TrialStore
from ape.task import Example, Task

pytestmark = pytest.mark.usefixtures("single_thread")

# A tiny policy and schedule: a run on the tiny model takes about a second.
KNOBS = dict(steps=3, prompts_per_step=4, minibatch=4, hidden=16, token_top_k=20, finalists=2)

POSITIVE = "good fine nice great happy sunny sweet lovely bright warm kind calm".split()
NEGATIVE = "bad awful sad grim cold dark sour ugly rude mean harsh dull".split()


def _examples(words, label):
    return [Example(w, label) for w in words]


@pytest.fixture(scope="module")
def sentiment() -> Task:
    """Two labels with one-word inputs: 8 train, 8 val, 8 test rows."""
    pos, neg = _examples(POSITIVE, "positive"), _examples(NEGATIVE, "negative")
    return Task(
        "sentiment",
        train=pos[:4] + neg[:4],
        val=pos[4:8] + neg[4:8],
        test=pos[8:] + neg[8:],
        labels=["negative", "positive"],
        verbalizers={"negative": "terrible", "positive": "great"},
    )


def _run(task, lm, **overrides):
    options = {**KNOBS, **overrides}
    return ape.optimize(
        task, model=lm, searcher="rl", evaluator="choice", seed=0, progress=False, **options
    )


def _objective(task, lm, budget=None, evaluator="choice"):
    store = TrialStore(None, "t", {"model": lm.name})
    scorer = make_evaluator(evaluator, task)
    return Objective(task, lm, scorer, store, budget=budget, progress=False)


def untimed(curve):
    """A training curve without its wall-clock times (which differ between equal runs)."""
    return [{k: v for k, v in point.items() if k != "seconds"} for point in curve]


def _trials(objective):
    return [t.user_attrs for t in objective.store.study.get_trials()]


# ---------------------------------------------------------------------------------- rewards
def test_label_margin_is_gold_minus_best_other_scaled():
    probs = np.array([[[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]]])  # one prompt, two examples
    gold = np.array([0, 1])
    margin = label_margin(np.log(probs), gold, correct=10.0, incorrect=20.0)
    assert margin.shape == (1, 2)
    assert margin[0, 0] == pytest.approx(10.0 * (0.7 - 0.2))
    assert margin[0, 1] == pytest.approx(20.0 * (0.3 - 0.5))


def test_label_margin_renormalises_over_the_labels():
    # The label words' probabilities need not sum to one; only their ratio matters.
    logprobs = np.log(np.array([[[0.03, 0.01]]]))
    assert label_margin(logprobs, np.array([0]), 1.0, 1.0)[0, 0] == pytest.approx(0.75 - 0.25)


def test_zscore_centres_and_scales_and_leaves_ties_at_zero():
    z = zscore(np.array([1.0, 2.0, 3.0, 10.0]))
    assert z.mean() == pytest.approx(0.0) and z.std() == pytest.approx(1.0)
    assert np.argmax(z) == 3
    assert np.all(zscore(np.array([5.0, 5.0, 5.0])) == 0.0)


# ---------------------------------------------------------------------------------- policy
def test_untrained_policy_is_the_lm_and_never_writes_line_breaks(tiny_lm):
    policy = PromptPolicy(tiny_lm, hidden=8, top_k=50, seed=0)
    rollout = policy.sample(6, 4, torch.Generator().manual_seed(0))
    assert rollout.tokens.shape == (6, 4)
    # The MLP's output layer starts at zero: logits are the LM head's own (banned ones aside).
    head = tiny_lm.model.get_output_embeddings()(rollout.states[:, 0]).float()
    logits = policy.logits(rollout.states[:, 0])
    allowed = torch.isfinite(logits)
    assert torch.allclose(logits[allowed], head[allowed], atol=1e-5)
    assert all("\n" not in text for text in policy.texts(rollout.tokens))
    logp, entropy = policy.log_probs(rollout)
    assert logp.shape == entropy.shape == (6, 4)
    assert torch.all(logp <= 0) and torch.all(entropy >= 0)
    assert torch.all(entropy <= np.log(50) + 1e-4)  # top-k: at most log k


# ---------------------------------------------------------------------------------- objective
def test_evaluate_train_returns_label_logprobs_and_records_accuracy(sentiment, tiny_lm):
    objective = _objective(sentiment, tiny_lm)
    prompts = [Prompt("Is it good?"), Prompt("Sentiment:")]
    examples = sentiment.train[:3]
    detail = objective.evaluate_train(prompts, examples, origin="rl")
    expected = objective.evaluator.label_logprobs(tiny_lm, prompts, examples)
    np.testing.assert_allclose(detail, expected, atol=1e-6)
    trials = _trials(objective)
    assert len(trials) == 2 and {t["split"] for t in trials} == {"train"}
    labels = objective.evaluator.resolve_labels(examples)
    gold = np.array([labels.index(e.output) for e in examples])
    for trial, row in zip(trials, expected, strict=True):
        assert trial["scores"] == (row.argmax(-1) == gold).astype(float).tolist()
    # Training scores never count as validation scores.
    assert all(not objective.candidates[p.key()].val for p in prompts)
    assert objective.budget.pairs == 6
    # Asking again is free and records nothing new.
    objective.evaluate_train(prompts, examples)
    assert objective.budget.pairs == 6 and len(_trials(objective)) == 2


def test_evaluate_train_stops_at_the_budget(sentiment, tiny_lm):
    objective = _objective(sentiment, tiny_lm, budget=5)
    with pytest.raises(BudgetExhausted):
        objective.evaluate_train([Prompt("a"), Prompt("b")], sentiment.train[:3])
    assert objective.budget.used == 5
    trials = _trials(objective)
    assert [len(t["scores"]) for t in trials] == [3, 2]


def test_evaluate_train_with_loglik_has_one_value_per_pair(task_file, tiny_lm):
    task = ape.load_task(task_file)
    objective = _objective(task, tiny_lm, evaluator="loglik")
    detail = objective.evaluate_train([Prompt("Reverse it.")], task.train[:4])
    assert detail.shape == (1, 4, 1)
    expected = objective.evaluator.score(tiny_lm, [Prompt("Reverse it.")], task.train[:4])
    np.testing.assert_allclose(detail[..., 0], expected, atol=1e-6)


# ---------------------------------------------------------------------------------- searcher
@pytest.fixture(scope="module")
def run(sentiment, tiny_lm):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(sentiment, tiny_lm)
    finally:
        torch.set_num_threads(before)


def test_run_records_a_trial_for_every_sampled_prompt(run, sentiment):
    curve = run.extras["training_curve"]
    assert [p["step"] for p in curve] == [1, 2, 3]
    sampled = {text for point in curve for text in point["prompts"]}
    assert all(len(point["prompts"]) == 4 for point in curve)
    assert all(np.isfinite(point["reward"]) and point["entropy"] >= 0 for point in curve)
    # Every finalist was scored on the whole validation pool; training never leaks into it.
    pool = len(sentiment.val)
    assert run.leaderboard and all(e.val_examples == pool for e in run.leaderboard)
    assert {e.origin for e in run.leaderboard} <= {"rl", "reference"}
    assert run.best.test_score is not None
    assert len(sampled) >= 1


def test_trials_cover_every_sampled_prompt(sentiment, tiny_lm):
    from ape.search.rl.searcher import RLSearcher

    objective = _objective(sentiment, tiny_lm)
    RLSearcher(**KNOBS).search(objective)
    curve = objective.extras["training_curve"]
    sampled = {text for point in curve for text in point["prompts"]}
    train_trials = {
        t["prompt"]["instruction"] for t in _trials(objective) if t.get("split") == "train"
    }
    assert sampled == train_trials
    assert objective.budget.pairs <= 3 * 4 * 4 + (2 + 1) * len(objective.val_pool)
    assert isinstance(objective.artifacts["policy"], PromptPolicy)


def test_the_policy_model_can_differ_from_the_task_model(sentiment, tiny_lm, tiny_model_dir):
    from ape.search.rl.searcher import RLSearcher

    objective = _objective(sentiment, tiny_lm)
    RLSearcher(**KNOBS, policy_model=str(tiny_model_dir)).search(objective)
    policy = objective.artifacts["policy"]
    assert policy.lm is not tiny_lm and policy.lm.name == str(tiny_model_dir)
    assert objective.lm is tiny_lm  # the prompts were scored by the task model
    assert len(objective.extras["training_curve"]) == KNOBS["steps"]


def test_same_seed_same_run(run, sentiment, tiny_lm):
    again = _run(sentiment, tiny_lm)

    assert untimed(again.extras["training_curve"]) == untimed(run.extras["training_curve"])
    assert [e.instruction for e in again.leaderboard] == [e.instruction for e in run.leaderboard]


def test_a_rerun_on_the_same_storage_replays_the_training_without_scoring(
    run, sentiment, tiny_lm, tmp_path
):
    storage = f"sqlite:///{tmp_path / 'rl.db'}"
    first = _run(sentiment, tiny_lm, storage=storage)
    assert first.budget_detail["pairs_computed"] > 0
    again = _run(sentiment, tiny_lm, storage=storage)  # e.g. after Ctrl-C, the same command
    assert again.budget_detail["pairs_computed"] == 0  # label log-probs came from the study
    assert again.budget_used == first.budget_used

    assert untimed(again.extras["training_curve"]) == untimed(first.extras["training_curve"])
    assert untimed(first.extras["training_curve"]) == untimed(run.extras["training_curve"])
    assert again.best == first.best


def test_other_seed_other_prompts(run, sentiment, tiny_lm):
    other = ape.optimize(
        sentiment,
        model=tiny_lm,
        searcher="rl",
        evaluator="choice",
        seed=1,
        progress=False,
        **KNOBS,
    )
    prompts = [p["prompts"] for p in other.extras["training_curve"]]
    assert prompts != [p["prompts"] for p in run.extras["training_curve"]]


@pytest.mark.parametrize("budget", [60, 100, 150])
def test_budget_is_a_hard_cap(sentiment, tiny_lm, budget):
    result = _run(sentiment, tiny_lm, budget=budget, steps=20)
    assert result.budget_used <= budget
    # The finalists' validation scoring fits: the training stopped early to leave room for it.
    assert result.leaderboard and result.leaderboard[0].val_examples == len(sentiment.val)
    assert len(result.extras["training_curve"]) < 20


def test_policy_weights_are_saved_and_reload(run, tiny_lm, tmp_path):
    path = run.save(tmp_path / "result.json")
    folder = Result.load(path).file("policy", path)
    assert (folder / "mlp.safetensors").is_file() and (folder / "policy.json").is_file()
    trained = run.artifacts["policy"]
    reloaded = load_policy(folder, tiny_lm)
    for name, value in trained.mlp.state_dict().items():
        assert torch.equal(value, reloaded.mlp.state_dict()[name])
    greedy = trained.sample(1, 5, None, greedy=True).tokens
    assert torch.equal(reloaded.sample(1, 5, None, greedy=True).tokens, greedy)
    # Training moved the weights away from the zero-initialised output layer.
    assert trained.mlp[2].weight.abs().sum() > 0
    saved = json.loads(path.read_text())
    assert len(saved["extras"]["training_curve"]) == 3


def test_loglik_tasks_train_on_the_reference_likelihood(task_file, tiny_lm):
    result = ape.optimize(
        task_file,
        model=tiny_lm,
        searcher="rl",
        evaluator="loglik",
        seed=0,
        progress=False,
        **KNOBS,
    )
    curve = result.extras["training_curve"]
    assert len(curve) == 3 and all(p["reward"] < 0 for p in curve)  # log-probs
    assert result.best is not None


def test_generation_evaluator_is_refused_with_a_clear_message(task_file, tiny_lm):
    with pytest.raises(ValueError, match="--evaluator choice"):
        ape.optimize(
            task_file,
            model=tiny_lm,
            searcher="rl",
            evaluator="generation",
            progress=False,
            **KNOBS,
        )


RL_MISMATCH = (
    "searcher 'rl' needs an evaluator with label log-probs or log-likelihood scores; "
    "'generation' offers none (use --evaluator choice, loglik or loglik_sum)"
)


def test_generation_is_refused_in_one_line_before_the_model_loads(task_file, capsys):
    with pytest.raises(ValueError) as err:
        ape.optimize(task_file, model="no/such-model", searcher="rl", evaluator="generation")
    assert str(err.value) == RL_MISMATCH
    argv = ["optimize", str(task_file), "--model", "no/such-model", "--searcher", "rl"]
    assert main([*argv, "--evaluator", "generation", "--storage", "memory"]) == 2
    assert capsys.readouterr().err.strip() == f"ape: error: {RL_MISMATCH}"


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="steps must be positive"):
        get_searcher("rl", steps=0)
    with pytest.raises(ValueError, match="entropy must be 0 or more"):
        get_searcher("rl", entropy=-1.0)
    with pytest.raises(ValueError, match="learning_rate must be 0 or more"):
        get_searcher("rl", learning_rate=-1e-5)


def test_learning_rate_zero_only_samples_and_selects(sentiment, tiny_lm):
    """The ablation: the policy stays the LM, so every step samples from the same distribution."""
    result = _run(sentiment, tiny_lm, learning_rate=0.0)
    policy = result.artifacts["policy"]
    assert policy.mlp[2].weight.abs().sum() == 0  # the residual never left zero
    assert len(result.extras["training_curve"]) == 3 and result.best is not None


def test_cli_optimize_with_rl(tmp_path, tiny_model_dir):
    rows = [{"input": w, "output": "great"} for w in POSITIVE] + [
        {"input": w, "output": "terrible"} for w in NEGATIVE
    ]
    data = tmp_path / "sentiment.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "result.json"
    code = main(
        [
            "optimize", str(data), "--model", str(tiny_model_dir), "--searcher", "rl",
            "--evaluator", "choice", "--steps", "2", "--prompts-per-step", "3",
            "--minibatch", "4", "--hidden", "8", "--token-top-k", "10",
            "--storage", "memory", "--out", str(out), "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    data = json.loads(out.read_text())
    assert data["searcher"] == "rl" and len(data["extras"]["training_curve"]) == 2
    assert (tmp_path / data["files"]["policy"] / "mlp.safetensors").is_file()


def test_classification_minibatches_are_balanced_and_seeded(sentiment):
    from ape.search.rl.searcher import _minibatches

    batches = _minibatches(sentiment.train, 4, seed=0, balanced=True)
    drawn = [next(batches) for _ in range(6)]
    for batch in drawn:
        assert sorted(e.output for e in batch) == ["negative", "negative", "positive", "positive"]
    again = _minibatches(sentiment.train, 4, seed=0, balanced=True)
    assert [next(again) for _ in range(6)] == drawn
