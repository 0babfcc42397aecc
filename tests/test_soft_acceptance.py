"""A trained soft prompt replaces its starting prompt only on significant validation evidence."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ape.search.acceptance import label_entropy, paired_gain, passes
from ape.search.soft import training as training_module
from ape.search.soft.prompt import SoftPrompt
from ape.search.soft.training import Checkpoints
from test_soft_prompt import _sentiment_task, soft_run

from ape.api import _open_store
from ape.evaluation import make_evaluator
from ape.objective import Objective, score_unranked
from ape.prefix import score_prompts
from ape.prompt import Prompt


def test_paired_gain_counts_wins_and_losses_and_tests_them():
    old = [0.0] * 32
    # 16 vs 14 (the kind of margin that kept a checkpoint which then lost on test)
    narrow = [1.0] * 16 + [0.0] * 16
    old_narrow = [0.0] * 16 + [1.0] * 14 + [0.0] * 2
    gain = paired_gain(narrow, old_narrow, alpha=0.05)
    assert (gain["wins"], gain["losses"]) == (16, 14)
    assert gain["p_value"] == pytest.approx(0.4278, abs=1e-4)  # scipy's exact binomial test
    assert not gain["accepted"]
    assert paired_gain(narrow, old_narrow, alpha=1.0)["accepted"]  # a higher mean suffices
    clear = paired_gain([1.0] * 6 + [0.0] * 26, old, alpha=0.05)
    assert clear["accepted"] and clear["p_value"] == pytest.approx(0.5**6)
    assert paired_gain(narrow, old_narrow, alpha=0.05, below_chance=True)["accepted"]
    assert not paired_gain(old, old, alpha=1.0)["accepted"]  # equal is not better
    assert not paired_gain(old, old, alpha=0.05, below_chance=True)["accepted"]
    assert not paired_gain([0.0] * 31 + [-1.0], old, alpha=1.0)["accepted"]


def test_label_entropy_is_the_best_input_blind_cross_entropy():
    assert label_entropy(["a", "b"] * 16) == pytest.approx(math.log(2))
    assert label_entropy(list("abcde") * 6) == pytest.approx(math.log(5))
    # 3:1 labels: predicting (0.75, 0.25) for every input gives exactly this cross-entropy
    assert label_entropy(["a", "a", "a", "b"]) == pytest.approx(
        -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    )
    assert label_entropy(["a"] * 3) == 0.0
    with pytest.raises(ValueError, match="at least one label"):
        label_entropy([])


@pytest.mark.parametrize(
    "val_loss, better, accepted",
    [(0.5, True, True), (0.9, True, False), (0.5, False, False)],
    ids=["below-chance", "above-chance", "below-chance-but-lower-mean"],
)
def test_a_checkpoint_below_chance_needs_only_a_higher_mean(
    tiny_lm, single_thread, monkeypatch, val_loss, better, accepted
):
    """2 wins and no loss is far from significant; a validation loss below the labels' entropy
    (log 2 here) is the other evidence that lets such a checkpoint replace the start."""
    task = _sentiment_task()
    scorer = make_evaluator("choice", task)
    store = _open_store(task, tiny_lm, scorer, None, None, False)
    objective = Objective(task, tiny_lm, scorer, store, progress=False)

    def weak_gain(new, old, alpha, below_chance=False):
        accepted = passes(better, 0.25, alpha, below_chance)
        return {"wins": 2, "losses": 0, "p_value": 0.25, "better": better, "accepted": accepted}

    monkeypatch.setattr(training_module, "paired_gain", weak_gain)
    losses = iter([1.2, val_loss])  # the start's validation loss, then the checkpoint's
    chance = label_entropy([ex.output for ex in task.val])
    run = Checkpoints(objective, tiny_lm, {}, lambda v, b: torch.tensor(next(losses)), 0.05, chance)
    width = tiny_lm.model.get_input_embeddings().weight.shape[1]
    run.begin(torch.zeros(2, width))
    run.checkpoint(2, torch.randn(2, width, generator=torch.Generator().manual_seed(0)))
    run.finish()
    acceptance = objective.extras["soft_prompt"]["acceptance"]
    assert acceptance["chance_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert acceptance["below_chance"] is (val_loss < chance)
    assert acceptance["accepted"] is accepted
    assert objective.artifacts["soft_prompt"].info["step"] == (2 if accepted else 0)
    assert any(e.startswith("soft step") for e in _origins(objective)) is accepted


def _origins(objective: Objective) -> set[str]:
    return {c.origin for c in objective.candidates.values() if c.val}


@pytest.mark.parametrize("below_chance", [True, False])
def test_the_chance_evidence_is_recorded_for_classification_unless_switched_off(
    tiny_lm, single_thread, below_chance
):
    result = soft_run(
        tiny_lm, seed=0, steps=6, batch_size=4, eval_every=2, lr=0.05, below_chance=below_chance
    )
    acceptance = result.extras["soft_prompt"]["acceptance"]
    assert ("chance_loss" in acceptance) is below_chance
    if below_chance:
        assert acceptance["chance_loss"] == pytest.approx(math.log(2), abs=1e-6)
        picked = result.extras["soft_prompt"]["picked_step"]
        losses = {c["step"]: c["val_loss"] for c in result.extras["soft_prompt"]["checkpoints"]}
        assert acceptance["val_loss"] == pytest.approx(losses[picked])


def _run(tiny_lm, accept_p: float):
    # loglik scores are continuous, so the tiny model's checkpoints differ on every example
    return soft_run(
        tiny_lm,
        evaluator="loglik",
        seed=0,
        steps=6,
        batch_size=4,
        eval_every=2,
        lr=0.05,
        accept_p=accept_p,
    )


def test_an_accepted_checkpoint_is_scored_as_the_test_saw_it(tiny_lm, single_thread):
    result = _run(tiny_lm, accept_p=1.0)
    extras = result.extras["soft_prompt"]
    acceptance = extras["acceptance"]
    assert acceptance["accepted"] and not extras["kept_start"]
    entry = next(e for e in result.leaderboard if e.origin == f"soft step {acceptance['step']}")
    # The test's own pass and the leaderboard's scoring are the same computation.
    assert entry.val_score == pytest.approx(acceptance["val_score"], abs=1e-6)
    assert result.artifacts["soft_prompt"].label == entry.instruction == result.best.instruction


def test_a_checkpoint_without_significant_evidence_keeps_the_start(tiny_lm, single_thread):
    # 8 validation rows: even 8 wins of 8 give p = 1/256, above this level
    result = _run(tiny_lm, accept_p=0.001)
    extras = result.extras["soft_prompt"]
    acceptance = extras["acceptance"]
    assert (acceptance["wins"], acceptance["losses"]) == (8, 0)  # better on every example ...
    assert not acceptance["accepted"] and extras["kept_start"]  # ... but not significantly
    assert not [e for e in result.leaderboard if e.origin.startswith("soft step")]
    assert result.best.origin == "soft: initial prompt"
    assert result.artifacts["soft_prompt"].label == extras["start_label"]


def test_accept_p_must_be_a_level():
    with pytest.raises(ValueError, match="accept_p must be in"):
        soft_run(None, accept_p=0.0)


@pytest.mark.parametrize("evaluator", ["choice", "loglik"])
def test_an_unranked_score_is_the_soft_prompts_own(tiny_lm, single_thread, evaluator):
    """The acceptance pass (stored, unranked) scores the vectors, not the bare template: the
    same numbers as scoring through the prefixed model directly."""
    task = _sentiment_task()
    scorer = make_evaluator(evaluator, task)
    store = _open_store(task, tiny_lm, scorer, None, None, False)
    objective = Objective(task, tiny_lm, scorer, store, progress=False)
    width = tiny_lm.model.get_input_embeddings().weight.shape[1]
    vectors = torch.randn(3, width, generator=torch.Generator().manual_seed(0))
    soft = SoftPrompt(vectors, tiny_lm.name).prompt()
    row = score_unranked(objective, soft, task.val, origin="test")
    direct = score_prompts(scorer, tiny_lm, [soft], task.val)[0]
    np.testing.assert_allclose(row, direct, atol=1e-9)
    assert objective.computed_pairs == len(task.val)
    assert not objective.candidates[soft.key()].val  # never a leaderboard entry
    if evaluator == "loglik":  # continuous scores: the vectors visibly change them
        bare = score_prompts(scorer, tiny_lm, [Prompt("")], task.val)[0]
        assert np.abs(row - bare).max() > 1e-3
