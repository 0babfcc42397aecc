"""Searchers: proposal cleaning, the UCB bandit, lookup by name, and every searcher end to end."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
from ape.search.ape.searcher import APESearcher
from ape.search.bandit import UCBBandit
from ape.search.base import available_searchers, get_searcher, searcher_class, searcher_options
from ape.search.baselines import GivenInstructions, NoInstruction, RandomDemos
from ape.search.proposal import (
    clean_instruction,
    proposal_origin,
    proposal_prompt,
    resample_prompt,
    unique,
)
from conformance import evaluator_for, small_options

import ape
from ape.objective import BudgetExhausted, Objective
from ape.prompt import Prompt
from ape.study import TrialStore
from ape.task import Example, Task

pytestmark = pytest.mark.usefixtures("single_thread")


# --------------------------------------------------------------------------------- proposal
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (" write the opposite of the word.", "write the opposite of the word."),
        ("The instruction was to reverse the word.", "reverse the word."),
        ("the instruction is: spell it backwards", "spell it backwards"),
        ('Sure! Here is the new instruction: "Reverse each word."', "Reverse each word."),
        ("Sure! The instruction was to spell it backwards", "spell it backwards"),
        ("Here's a variation of the instruction: Mirror the word.", "Mirror the word."),
        ("The friend was asked to reverse each input.", "reverse each input."),
        ("Instruction: 'Flip the word'", "Flip the word"),
        ("Answer: “Mirror the letters.”", "Mirror the letters."),
        ("Reverse the letters. Then say hi.", "Reverse the letters."),
        ("Reverse v1.2 of it. Next", "Reverse v1.2 of it."),
        ("'Give the antonym.' Then more.", "Give the antonym."),
        ('"Reverse each word." I hope this helps!', "Reverse each word."),
        ("\n\n  Reverse it.\nSecond line.", "Reverse it."),
        ("", None),
        ("  \n\t\n", None),
        ("123 456!", None),
        ("...", None),
        ("ok", None),
        ("a" * 201, None),
    ],
)
def test_clean_instruction(raw, expected):
    assert clean_instruction(raw) == expected


def test_clean_instruction_max_chars():
    text = "Reverse " + "the word " * 5
    assert clean_instruction(text, max_chars=len(text)) == text.strip()
    assert clean_instruction(text, max_chars=20) is None


def test_unique_drops_none_and_repeats_ignoring_case_spacing_and_final_period():
    texts = ["Reverse it.", "reverse  it", None, " REVERSE IT ", "Flip it", "flip it."]
    assert unique(texts) == ["Reverse it.", "Flip it"]
    assert unique(texts, seen=["flip IT"]) == ["Reverse it."]
    assert unique([None, None]) == []


def test_proposal_prompt_shows_the_demos_and_ends_for_completion():
    demos = [Example("stone", "enots"), Example("cloud", "duolc"), Example("river", "revir")]
    text = proposal_prompt(demos)
    for demo in demos:
        assert f"Input: {demo.input}\nOutput: {demo.output}" in text
    assert "three inputs" in text
    assert text.endswith("The instruction was to")
    chat = proposal_prompt(demos, chat=True)
    assert "Input: river\nOutput: revir" in chat and not chat.endswith("The instruction was to")
    assert "12 inputs" in proposal_prompt([demos[0]] * 12)
    assert "Reverse the word." in resample_prompt("Reverse the word.")
    assert "Reverse the word." in resample_prompt("Reverse the word.", chat=True)


# --------------------------------------------------------------------------------- the bandit
class TableEvaluator:
    """Score = the instruction's value in a table plus small per-example noise; records pulls."""

    name = "table"

    def __init__(self, table: dict[str, float]) -> None:
        self.table = dict(table)
        self.pulls: list[tuple[str, list[str]]] = []  # (instruction, example keys) per prompt

    def score(self, lm, prompts, examples) -> np.ndarray:
        for prompt in prompts:
            self.pulls.append((prompt.instruction, [e.key() for e in examples]))
        return np.array([[_value(self.table, p.instruction, e) for e in examples] for p in prompts])


def _value(table: dict[str, float], instruction: str, example: Example) -> float:
    return table[instruction] + (zlib.crc32(example.key().encode()) % 100 - 50) / 1000


class NoLM:
    name = "none"

    def loglikelihood(self, requests, *, return_counts=False):
        raise AssertionError("not used")

    def generate(self, prompts, **kwargs):
        raise AssertionError("not used")


TABLE = {"D": 0.1, "C": 0.4, "B": 0.5, "A": 0.9}


def _objective(table, val=80, budget=None) -> Objective:
    task = Task(
        "toy",
        train=[Example("t", "t")],
        val=[Example(f"v{i}", f"{i}v") for i in range(val)],
        test=[Example("x", "x")],
    )
    store = TrialStore(None, "bandit", {"task": "toy"})
    return Objective(
        task, NoLM(), TableEvaluator(table), store, budget=budget, seed=3, progress=False
    )


def test_bandit_pulls_every_unpulled_arm_first_in_the_order_added():
    objective = _objective(TABLE)
    bandit = UCBBandit(objective, minibatch=2, c=1.0)
    bandit.add([Prompt(t) for t in TABLE], "proposal")  # D, C, B, A: the best is added last
    bandit.round(per_round=2)
    assert [i for i, _ in objective.evaluator.pulls] == ["D", "C"]
    bandit.round(per_round=2)
    assert [i for i, _ in objective.evaluator.pulls] == ["D", "C", "B", "A"]
    assert all(len(arm.scores) == 2 for arm in bandit.arms.values())

    # A newly added arm (a resampled variation) goes before every pulled one.
    bandit.add([Prompt("E")], "resample 1")
    objective.evaluator.table["E"] = 0.0
    bandit.round(per_round=1)
    assert objective.evaluator.pulls[-1][0] == "E"
    assert objective.candidates[Prompt("E").key()].origin == "resample 1"


def test_bandit_spends_most_pulls_on_the_best_arm_on_unseen_examples():
    objective = _objective(TABLE)
    bandit = UCBBandit(objective, minibatch=2, c=1.0)
    bandit.add([Prompt(t) for t in TABLE], "proposal")
    bandit.run(rounds=30, per_round=1)

    counts = {arm.prompt.instruction: len(arm.scores) // 2 for arm in bandit.arms.values()}
    assert sum(counts.values()) == 30
    assert max(counts, key=counts.get) == "A"
    assert counts["A"] > sum(counts[k] for k in "BCD")
    assert [arm.prompt.instruction for arm in bandit.top(1)] == ["A"]
    assert [arm.prompt.instruction for arm in bandit.top(4)] == ["A", "B", "C", "D"]

    # Each pull of an arm takes the next block of the shared validation order.
    order = [e.key() for e in objective.val_order]
    for instruction in TABLE:
        blocks = [keys for i, keys in objective.evaluator.pulls if i == instruction]
        assert all(len(keys) == 2 for keys in blocks)
        seen = [k for keys in blocks for k in keys]
        assert seen == order[: len(seen)], instruction
        arm = bandit.arms[Prompt(instruction).key()]
        assert len(arm.scores) == len(seen)
        expected = [_value(TABLE, instruction, e) for e in objective.val_order[: len(seen)]]
        assert arm.mean == pytest.approx(np.mean(expected))


def test_upper_bounds_scale_the_bonus_by_the_score_spread():
    objective = _objective({"a": 0.0, "b": 1.0})
    bandit = UCBBandit(objective, minibatch=4, c=2.0)
    bandit.add([Prompt("a"), Prompt("b"), Prompt("c")], "proposal")
    bandit.round(per_round=2)
    arms = list(bandit.arms.values())
    bounds = bandit.upper_bounds(arms)
    assert math.isinf(bounds[2])  # never pulled
    seen = [s for a in arms for s in a.scores]
    bonus = 2.0 * np.std(seen) * math.sqrt(math.log(len(seen)) / 4)
    assert bounds[0] == pytest.approx(arms[0].mean + bonus)
    assert bounds[1] == pytest.approx(arms[1].mean + bonus)


def test_bandit_stops_when_every_arm_has_seen_the_whole_validation_split():
    objective = _objective(TABLE, val=4)
    bandit = UCBBandit(objective, minibatch=3, c=1.0)
    bandit.add([Prompt(t) for t in TABLE], "proposal")
    bandit.run(rounds=100, per_round=4)
    assert all(len(arm.scores) == 4 for arm in bandit.arms.values())
    assert bandit.open_arms() == []
    assert len(objective.evaluator.pulls) == 8  # two pulls per arm: 3 examples, then 1


def test_bandit_keeps_what_fit_when_the_budget_stops_a_round():
    objective = _objective(TABLE, budget=5)
    bandit = UCBBandit(objective, minibatch=2, c=1.0)
    bandit.add([Prompt(t) for t in TABLE], "proposal")
    with pytest.raises(BudgetExhausted):
        bandit.run(rounds=5, per_round=4)
    lengths = [len(arm.scores) for arm in bandit.arms.values()]
    assert lengths == [2, 2, 1, 0]
    assert objective.budget.used == 5


# --------------------------------------------------------------------------------- lookup
def test_get_searcher_names_an_unknown_searcher_and_the_choices():
    with pytest.raises(ValueError, match="unknown searcher 'bogus'") as info:
        get_searcher("bogus")
    for name in ("ape", "none", "given", "demos"):
        assert name in str(info.value)


def test_get_searcher_names_an_unknown_option():
    with pytest.raises(ValueError, match="no option shots") as info:
        get_searcher("demos", shots=3)
    assert "k" in str(info.value)
    with pytest.raises(ValueError, match="searcher 'none' has no option k"):
        get_searcher("none", k=3)


def test_get_searcher_builds_with_options():
    assert get_searcher("demos", k=2) == RandomDemos(k=2)
    assert get_searcher("given", instructions=("a",)).instructions == ("a",)
    assert isinstance(get_searcher("none"), NoInstruction)
    assert get_searcher("ape", rounds=0, resample_rounds=0).rounds == 0
    assert {"ape", "none", "given", "demos"} <= set(available_searchers())
    assert {f.name for f in searcher_options("demos")} == {"k"}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"minibatch": 0}, "minibatch must be positive"),
        ({"num_proposals": -1}, "num_proposals must be positive"),
        ({"finalists": 0}, "finalists must be positive"),
        ({"rounds": -1}, "rounds must be 0 or more"),
        ({"resample_rounds": -2}, "resample_rounds must be 0 or more"),
        ({"templates": "sideways"}, "templates must be one of"),
        ({"temperature": -0.5}, "temperature must be 0 or more"),
        ({"c": -1.0}, "c must be 0 or more"),
    ],
)
def test_ape_searcher_rejects_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        get_searcher("ape", **options)


def test_random_demos_rejects_k_below_one():
    with pytest.raises(ValueError, match="k must be positive"):
        RandomDemos(k=0)


def test_chat_templates_need_a_chat_model():
    objective = _objective(TABLE)
    with pytest.raises(ValueError, match="needs a chat model"):
        APESearcher(templates="chat").search(objective)


# --------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("name", available_searchers())
def test_every_registered_searcher_runs_through_optimize(name, tiny_lm, task_file):
    cls = searcher_class(name)  # its own small options (test_options) and an evaluator it takes
    options = small_options(cls)
    result = ape.optimize(
        task_file,
        model=tiny_lm,
        searcher=name,
        evaluator=evaluator_for(cls),
        seed=0,
        progress=False,
        **options,
    )
    assert result.searcher == name and result.task == "words" and result.model == "tiny"
    best = result.best
    assert best is not None and best == result.leaderboard[0]
    assert best.val_examples == 15  # the whole validation split of 40 rows (25% test, half val)
    assert math.isfinite(best.val_score)
    assert best.test_score is not None and math.isfinite(best.test_score)
    assert result.reference is not None and result.reference.instruction == ""
    assert result.reference.test_score is not None
    assert result.budget_used > 0 and not result.stopped_by_budget and not result.interrupted
    if name == "given":
        assert {e.instruction for e in result.leaderboard} == set(options["instructions"])
    if name == "demos":
        assert best.instruction == "" and len(best.demos) == 2
    if name == "none":
        assert best.instruction == "" and best.demos == []
    if name == "ape":
        origins = {"proposal", "proposal (chat)", "resample 1", "resample 1 (chat)"}
        assert best.instruction and best.origin in origins
        assert result.budget_detail["tokens"] > 0
        assert {e.origin for e in result.leaderboard} <= origins
        assert "proposal (chat)" in {e.origin for e in result.leaderboard}  # a chat tokenizer


def test_given_without_instructions_needs_task_instructions(tiny_lm, task_file):
    with pytest.raises(ValueError, match="searcher 'given' needs instructions"):
        ape.optimize(task_file, model=tiny_lm, searcher="given", progress=False)


def test_demos_needs_enough_training_examples(tiny_lm, task_file):
    with pytest.raises(ValueError, match="k=99 demos asked"):
        ape.optimize(task_file, model=tiny_lm, searcher="demos", k=99, progress=False)


def test_given_instructions_is_the_searcher_class():
    assert get_searcher("given", instructions=("x",)) == GivenInstructions(instructions=("x",))


def test_origins_name_a_proposer_other_than_the_target_in_every_step():
    class Named:
        def __init__(self, name):
            self.name = name

    target, served = Named("smollm2-135m"), Named("openai:qwen@http://h/v1")
    objective = type("O", (), {"lm": target})()
    assert proposal_origin(objective, target, chat=True, step="resample 1") == "resample 1 (chat)"
    assert proposal_origin(objective, target, chat=False) == "proposal"
    named = proposal_origin(objective, served, chat=True, step="resample 2")
    assert named == "resample 2 (openai:qwen@http://h/v1, chat)"
