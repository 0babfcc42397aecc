"""The TPE searcher: the shared proposal step, minibatches along the validation order, periodic and
final full evaluations, the seed, and the budget."""

from __future__ import annotations

import math
import zlib

import numpy as np
import optuna
import pytest
import torch
from ape.search.ape.searcher import APESearcher
from ape.search.base import get_searcher
from ape.search.proposal import clean_instruction, proposal_prompt, propose, unique
from ape.search.tpe.searcher import TPESearcher

import ape
from ape.evaluation import make_evaluator
from ape.objective import Objective
from ape.prompt import Prompt
from ape.ranking import ranked
from ape.study import TrialStore
from ape.task import Example, Task

pytestmark = pytest.mark.usefixtures("single_thread")

# Small TPE knobs: a run on the tiny model takes a few seconds.
KNOBS = dict(
    num_subsamples=2,
    num_proposals=3,
    max_new_tokens=8,
    num_demo_sets=3,
    max_demos=2,
    trials=12,
    minibatch=5,
    full_eval_every=4,
    finalists=2,
    n_startup_trials=4,
)
POOL = 15  # the synthetic task's validation split (40 rows: 10 test, 15 val, 15 train)


def _tpe(task_file, lm, seed=0, **overrides):
    options = {**KNOBS, **overrides}
    return ape.optimize(task_file, model=lm, searcher="tpe", seed=seed, progress=False, **options)


@pytest.fixture(scope="module")
def first_run(task_file, tiny_lm):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _tpe(task_file, tiny_lm)
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------- end to end
def test_tpe_runs_through_optimize_and_picks_a_fully_evaluated_prompt(first_run, task_file):
    result = first_run
    assert result.searcher == "tpe" and result.model == "tiny"
    best = result.best
    assert best is not None and best == result.leaderboard[0]
    assert best.val_examples == POOL
    assert math.isfinite(best.val_score) and math.isfinite(best.test_score)
    assert not result.stopped_by_budget and result.budget_detail["tokens"] > 0
    # The finalists are scored on the whole pool; every other prompt on whole minibatches.
    assert sum(e.val_examples == POOL for e in result.leaderboard) >= KNOBS["finalists"]
    assert {e.val_examples for e in result.leaderboard} <= {5, 10, 15}
    # Demos come from the training split, at most max_demos of them, named in the origin.
    train = {(ex.input, ex.output) for ex in ape.load_task(task_file, seed=0).train}
    assert any(e.demos for e in result.leaderboard)  # TPE tried demos
    for entry in result.leaderboard:
        assert entry.instruction and entry.origin.startswith("proposal")
        assert len(entry.demos) <= KNOBS["max_demos"]
        assert all(tuple(d) in train for d in entry.demos)
        count = len(entry.demos)
        assert entry.origin.endswith(f"+ {count} demo{'s' * (count > 1)}") == bool(count)


def test_the_same_seed_gives_the_same_result(first_run, task_file, tiny_lm):
    again = _tpe(task_file, tiny_lm)

    def rows(result):
        return [(e.instruction, e.demos, e.origin, e.val_examples) for e in result.leaderboard]

    assert rows(again) == rows(first_run)
    np.testing.assert_allclose(
        [e.val_score for e in again.leaderboard],
        [e.val_score for e in first_run.leaderboard],
        rtol=1e-6,
    )
    assert again.budget_used == first_run.budget_used
    # Another seed samples other proposals (temperature 0.9 over a random model's vocabulary).
    other = _tpe(task_file, tiny_lm, seed=1)
    assert {e.instruction for e in other.leaderboard}.isdisjoint(
        {e.instruction for e in first_run.leaderboard}
    )


def test_a_budget_is_filled_but_never_exceeded(task_file, tiny_lm):
    result = _tpe(task_file, tiny_lm, budget=400)
    assert result.budget_used <= 400
    # Trials go on until only a minibatch and the finalists' full evaluation are left to pay.
    assert result.budget_used > 400 - (KNOBS["minibatch"] + KNOBS["finalists"] * POOL)
    assert not result.stopped_by_budget
    assert result.best.val_examples == POOL

    tight = _tpe(task_file, tiny_lm, budget=100)  # the proposals alone cost most of it
    assert tight.stopped_by_budget and tight.budget_used <= 100


def test_a_budget_stops_when_trials_find_nothing_new(task_file, tiny_lm):
    # Two prompts (one instruction, 0 or 1 demo) see the whole split in six trials; after
    # `trials` trials in a row with nothing new to score, the search ends far below the budget.
    result = _tpe(
        task_file,
        tiny_lm,
        budget=10**6,
        num_subsamples=1,
        num_proposals=2,
        templates="forward",
        num_demo_sets=1,
        max_demos=1,
        trials=5,
    )
    assert not result.stopped_by_budget and result.budget_used < 1000
    assert result.best.val_examples == POOL


# ------------------------------------------------------------------------- the proposal step
def _tiny_objective(task_file, lm, seed=0) -> Objective:
    task = ape.load_task(task_file, seed=seed)
    evaluator = make_evaluator("loglik", task)
    store = TrialStore(None, "proposal", {"task": task.name})
    return Objective(task, lm, evaluator, store, seed=seed, progress=False)


def _old_ape_proposals(objective, proposer, chats, s, d, p, temperature, tokens, chars):
    """APE's proposal step as it was written inline before it was factored out."""
    rng = np.random.default_rng(objective.seed)
    train = objective.task.train
    subsamples = [
        [train[i] for i in rng.choice(len(train), min(d, len(train)), False)] for _ in range(s)
    ]
    proposals, origins = [], []
    for chat in chats:
        prompts = [proposal_prompt(demos, chat=chat) for demos in subsamples]
        outputs = objective.generate(
            prompts,
            n=p,
            temperature=temperature,
            max_new_tokens=tokens,
            seed=objective.seed,
            chat=chat,
            stop=["\n"],
            lm=proposer,
        )
        texts = [clean_instruction(text, chars) for out in outputs for text in out]
        found = unique(texts, seen=proposals)
        origins += ["proposal" + (" (chat)" if chat else "")] * len(found)
        proposals += found
    return list(zip(proposals, origins, strict=True))


def test_the_proposal_step_is_apes(task_file, tiny_lm):
    knobs = dict(num_subsamples=2, num_demos=3, num_proposals=3, max_new_tokens=8)
    args = dict(temperature=0.9, max_chars=200, **knobs)
    chats = [False, True]  # the tiny model has SmolLM2's chat template

    factored = _tiny_objective(task_file, tiny_lm, seed=3)
    steps = list(propose(factored, tiny_lm, chats, **args))
    proposed = [(text, origin) for origin, found in steps for text in found]
    assert [origin for origin, _ in steps] == ["proposal", "proposal (chat)"]
    assert len(proposed) >= 4

    old = _tiny_objective(task_file, tiny_lm, seed=3)
    assert _old_ape_proposals(old, tiny_lm, chats, 2, 3, 3, 0.9, 8, 200) == proposed
    assert old.budget.tokens == factored.budget.tokens

    # What APE adds as proposal candidates is exactly that, in that order.
    ape_run = _tiny_objective(task_file, tiny_lm, seed=3)
    APESearcher(rounds=1, resample_rounds=0, finalists=1, **knobs).search(ape_run)
    added = [
        (c.prompt.instruction, c.origin)
        for c in ape_run.candidates.values()
        if c.origin.startswith("proposal")
    ]
    assert added == proposed

    # TPE's instruction pool is the same step's output, origins included.
    tpe_run = _tiny_objective(task_file, tiny_lm, seed=3)
    TPESearcher(trials=8, minibatch=5, finalists=1, **knobs).search(tpe_run)
    origin_of = dict(proposed)
    for candidate in tpe_run.candidates.values():
        assert candidate.origin.startswith(origin_of[candidate.prompt.instruction])


# --------------------------------------------------------------------------------- on a table
class ListLM:
    """Proposes the given instructions in turn; no tokenizer, so the forward template only."""

    name = "list"

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def generate(self, prompts, *, n=1, **kwargs):
        return [
            [self.texts[(i * n + j) % len(self.texts)] for j in range(n)]
            for i in range(len(prompts))
        ]

    def loglikelihood(self, requests, *, return_counts=False):
        raise AssertionError("not used")


class TableEvaluator:
    """Score = a function of (instruction, example); records each scored (instruction, keys)."""

    def __init__(self, value) -> None:
        self.value = value
        self.pulls: list[tuple[str, list[str]]] = []

    def score(self, lm, prompts, examples) -> np.ndarray:
        self.pulls += [(p.instruction, [e.key() for e in examples]) for p in prompts]
        return np.array([[self.value(p, e) for e in examples] for p in prompts])


def _noise(example: Example) -> float:
    return (zlib.crc32(example.key().encode()) % 100 - 50) / 1000


def _table_objective(texts, value, val=40, val_examples=20) -> Objective:
    task = Task(
        "toy",
        train=[Example(f"t{i}", f"{i}t") for i in range(6)],
        val=[Example(f"v{i}", f"{i}v") for i in range(val)],
        test=[Example("x", "x")],
    )
    store = TrialStore(None, "table", {"task": "toy"})
    return Objective(
        task,
        ListLM(texts),
        TableEvaluator(value),
        store,
        seed=0,
        val_examples=val_examples,
        progress=False,
    )


def _walks_the_order(objective: Objective) -> None:
    """Each prompt was scored on a prefix of the shared validation order, each example once."""
    order = [e.key() for e in objective.val_order]
    by_prompt: dict[str, list[str]] = {}
    for instruction, keys in objective.evaluator.pulls:
        by_prompt.setdefault(instruction, []).extend(keys)
    for instruction, seen in by_prompt.items():
        assert seen == order[: len(seen)], instruction


def test_the_final_pick_is_made_on_full_evaluations_not_minibatches():
    # "lucky" scores 1 on the first minibatch of the order and 0 after; "steady" 0.6 throughout.
    objective = _table_objective(["Answer luckily.", "Answer steadily."], None)
    first = {e.key() for e in objective.val_order[:5]}

    def value(prompt, example):
        if prompt.instruction == "Answer luckily.":
            return 1.0 if example.key() in first else 0.0
        return 0.6

    objective.evaluator.value = value
    searcher = TPESearcher(
        num_subsamples=1,
        num_proposals=2,
        num_demo_sets=1,
        max_demos=0,
        trials=2,
        minibatch=5,
        full_eval_every=100,
        finalists=2,
        n_startup_trials=2,
    )
    searcher.search(objective)
    _walks_the_order(objective)
    pool = [e.key() for e in objective.val_pool]
    lucky = objective.candidates[Prompt("Answer luckily.").key()]
    assert lucky.val_score < 0.6 and all(k in lucky.val for k in pool)
    best = ranked(list(objective.candidates.values()), pool)[0]
    assert best.prompt.instruction == "Answer steadily."
    assert all(k in best.val for k in pool)


def test_periodic_full_evaluations_take_the_best_unfinished_prompt(monkeypatch):
    table = {"Do alpha.": 0.2, "Do beta.": 0.5, "Do gamma.": 0.4, "Do delta.": 0.1}
    objective = _table_objective(list(table), lambda p, e: table[p.instruction] + _noise(e), 60)
    pool_size = len(objective.val_pool)
    full: list[tuple[str, dict[str, float], dict[str, int]]] = []
    evaluate = objective.evaluate

    def spy(prompts, examples, origin=""):
        if list(examples) == objective.val_pool:
            state = {c.prompt.instruction: c for c in objective.candidates.values()}
            means = {k: c.val_score for k, c in state.items()}
            counts = {k: len(c.val) for k, c in state.items()}
            full.extend((p.instruction, means, counts) for p in prompts)
        return evaluate(prompts, examples, origin)

    monkeypatch.setattr(objective, "evaluate", spy)
    searcher = TPESearcher(
        num_subsamples=1,
        num_proposals=4,
        num_demo_sets=1,
        max_demos=0,
        trials=8,
        minibatch=5,
        full_eval_every=4,
        finalists=1,
        n_startup_trials=4,
    )
    searcher.search(objective)
    _walks_the_order(objective)
    assert len(full) == 3  # after trials 4 and 8, then the finalist
    for chosen, means, counts in full[:2]:
        unfinished = [k for k in means if counts[k] < pool_size]
        assert chosen in unfinished
        assert means[chosen] == max(means[k] for k in unfinished)
    chosen, means, _ = full[2]
    assert means[chosen] == max(means.values())


def test_a_prompt_that_saw_the_whole_split_is_not_scored_again(monkeypatch):
    objective = _table_objective(["Do alpha."], lambda p, e: 0.3 + _noise(e), val=10)
    told: list[float] = []
    tell = optuna.Study.tell

    def record(self, trial, values=None, *args, **kwargs):
        told.append(values)
        return tell(self, trial, values, *args, **kwargs)

    monkeypatch.setattr(optuna.Study, "tell", record)
    calls: list[int] = []
    evaluate_each = objective.evaluate_each

    def count(requests, origin=""):
        calls.append(len(requests))
        return evaluate_each(requests, origin)

    monkeypatch.setattr(objective, "evaluate_each", count)
    TPESearcher(
        num_subsamples=1, num_proposals=1, num_demo_sets=1, max_demos=0, trials=5, minibatch=5
    ).search(objective)
    assert [len(keys) for _, keys in objective.evaluator.pulls] == [5, 5]
    assert len(calls) == 3  # two trials' minibatches and the finalist; none for trials 3 to 5
    full_mean = objective.candidates[Prompt("Do alpha.").key()].val_score
    assert len(told) == 5 and told[1:] == [pytest.approx(full_mean)] * 4
    assert told[0] == pytest.approx(np.mean([0.3 + _noise(e) for e in objective.val_order[:5]]))


# --------------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"minibatch": 0}, "minibatch must be positive"),
        ({"trials": 0}, "trials must be positive"),
        ({"num_demo_sets": 0}, "num_demo_sets must be positive"),
        ({"full_eval_every": -1}, "full_eval_every must be positive"),
        ({"finalists": 0}, "finalists must be positive"),
        ({"num_proposals": 0}, "num_proposals must be positive"),
        ({"max_demos": -1}, "max_demos must be 0 or more"),
        ({"n_startup_trials": -1}, "n_startup_trials must be 0 or more"),
        ({"temperature": -0.1}, "temperature must be 0 or more"),
        ({"templates": "sideways"}, "templates must be one of"),
    ],
)
def test_tpe_rejects_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        get_searcher("tpe", **options)


def test_tpe_is_registered_with_documented_defaults():
    searcher = get_searcher("tpe")
    assert isinstance(searcher, TPESearcher) and searcher.name == "tpe"
    assert (searcher.trials, searcher.minibatch, searcher.finalists) == (40, 10, 3)
    assert (searcher.num_demo_sets, searcher.max_demos, searcher.full_eval_every) == (6, 4, 10)
