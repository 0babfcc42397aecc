"""The objective: budget cap, logical charging, the trial store and replay of scores and text."""

from __future__ import annotations

import zlib

import numpy as np
import optuna
import pytest

import ape
from ape.objective import Budget, BudgetExhausted, Objective
from ape.prompt import Prompt
from ape.study import TrialStore, open_storage
from ape.task import Example, Task

pytestmark = pytest.mark.usefixtures("single_thread")

FINGERPRINT = {"model": "fake", "evaluator": "CountingEvaluator()", "task": "toy"}


def _score(prompt: Prompt, example: Example) -> float:
    """A deterministic score that differs per (prompt, example) pair."""
    return -(zlib.crc32(f"{prompt.key()}|{example.key()}".encode()) % 1000) / 100


class CountingEvaluator:
    """Scores from `_score`; records every call as (instructions, example inputs)."""

    name = "counting"

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[str]]] = []

    def __repr__(self) -> str:
        return "CountingEvaluator()"

    @property
    def pairs(self) -> int:
        return sum(len(p) * len(e) for p, e in self.calls)

    def score(self, lm, prompts, examples) -> np.ndarray:
        self.calls.append(([p.instruction for p in prompts], [e.input for e in examples]))
        return np.array([[_score(p, e) for e in examples] for p in prompts], dtype=float)


class FakeLM:
    """Writes numbered answers; scoring is never asked of it here. Records generate() calls."""

    name = "fake"

    def __init__(self, tokenizer=None) -> None:
        self.tokenizer = tokenizer
        self.generate_calls: list[list[str]] = []

    def loglikelihood(self, requests, *, return_counts=False):
        raise AssertionError("the objective's evaluator does the scoring")

    def generate(self, prompts, n=1, temperature=0.0, max_new_tokens=32, seed=None, **kwargs):
        self.generate_calls.append(list(prompts))
        return [[f"answer {i} to {p}" for i in range(n)] for p in prompts]


def _task() -> Task:
    def examples(prefix: str, count: int) -> list[Example]:
        return [Example(f"{prefix}{i}", f"{prefix}{i}"[::-1]) for i in range(count)]

    return Task("toy", train=examples("train", 6), val=examples("val", 10), test=examples("t", 4))


def _objective(storage=None, budget=None, evaluator=None, lm=None, fingerprint=FINGERPRINT):
    store = TrialStore(storage, "study", fingerprint)
    return Objective(
        _task(),
        lm or FakeLM(),
        evaluator or CountingEvaluator(),
        store,
        budget=budget,
        seed=0,
        progress=False,
    )


def _sqlite(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'trials.db'}"


# --------------------------------------------------------------------------------- the budget
def test_budget_must_be_positive(tiny_lm, task_file):
    for bad in (0, -3):
        with pytest.raises(ValueError, match="positive"):
            Budget(bad)
    with pytest.raises(ValueError, match="budget must be a positive"):
        ape.optimize(task_file, model=tiny_lm, searcher="none", budget=0, progress=False)
    assert Budget(None).remaining == float("inf")
    assert Budget(7, pairs=2, tokens=3).remaining == 2


def test_budget_caps_scored_pairs_in_request_order():
    objective = _objective(budget=5)
    evaluator = objective.evaluator
    first, second = Prompt("first"), Prompt("second")
    examples = objective.val_order[:4]
    with pytest.raises(BudgetExhausted):
        objective.evaluate([first, second], examples)
    assert objective.budget.used == objective.budget.pairs == 5
    assert evaluator.pairs == 5 == objective.computed_pairs
    # The five that fit: all of `first`, then the first example of `second`.
    assert set(objective.candidates[first.key()].val) == {e.key() for e in examples}
    assert list(objective.candidates[second.key()].val) == [examples[0].key()]
    unscored = [(second.key(), e.key()) for e in examples[1:]]
    assert not any(pair in objective.store.scores for pair in unscored)


def test_after_exhaustion_charged_pairs_are_free_and_new_ones_are_refused():
    objective = _objective(budget=4)
    prompt = Prompt("p")
    examples = objective.val_order[:4]
    scores = objective.evaluate([prompt], examples)
    assert objective.budget.remaining == 0
    calls = len(objective.evaluator.calls)
    again = objective.evaluate([prompt], examples)  # no new pair: no charge, no exception
    np.testing.assert_array_equal(again, scores)
    assert len(objective.evaluator.calls) == calls
    with pytest.raises(BudgetExhausted):
        objective.evaluate([Prompt("new")], examples[:1])
    assert len(objective.evaluator.calls) == calls
    assert objective.budget.used == 4


def test_a_pair_asked_twice_in_one_run_is_charged_once():
    objective = _objective()
    evaluator = objective.evaluator
    p, q = Prompt("p"), Prompt("q")
    examples = objective.val_order[:3]
    first = objective.evaluate([p], examples)
    both = objective.evaluate([p, q], examples)
    np.testing.assert_array_equal(both[0], first[0])
    assert objective.budget.pairs == 6
    assert evaluator.pairs == 6  # p's three pairs were not computed again
    dup = objective.evaluate([p, p], objective.val_order[3:5])
    assert objective.budget.pairs == 8
    np.testing.assert_array_equal(dup[0], dup[1])
    expected = [[_score(p, e) for e in examples], [_score(q, e) for e in examples]]
    np.testing.assert_allclose(both, expected)


# --------------------------------------------------------------------------------- replay
def _session(objective: Objective) -> tuple[list[np.ndarray], bool]:
    """A fixed sequence of requests, as a searcher would make them."""
    order = objective.val_order
    out = []
    exhausted = False
    try:
        out.append(objective.evaluate([Prompt("a"), Prompt("b")], order[:3]))
        out.append(objective.evaluate([Prompt("a")], order[:5]))
        out.append(objective.evaluate([Prompt("c")], order[2:6]))
    except BudgetExhausted:
        exhausted = True
    return out, exhausted


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_second_objective_on_the_same_storage_replays_everything(tmp_path, kind):
    storage = _sqlite(tmp_path) if kind == "sqlite" else str(tmp_path / "sub" / "trials.log")
    first = _objective(storage)
    scores, _ = _session(first)
    assert first.computed_pairs == first.evaluator.pairs == 12

    second = _objective(storage)
    assert second.store.trials_loaded > 0
    replayed, _ = _session(second)
    assert second.computed_pairs == 0 and second.evaluator.calls == []
    for a, b in zip(scores, replayed, strict=True):
        np.testing.assert_array_equal(a, b)
    assert second.budget.used == first.budget.used == 12


def test_a_replayed_run_spends_and_stops_exactly_like_the_first(tmp_path):
    storage = _sqlite(tmp_path)
    first = _objective(storage, budget=8)
    scores, exhausted = _session(first)
    assert exhausted and first.budget.used == 8

    second = _objective(storage, budget=8)
    replayed, exhausted_again = _session(second)
    assert exhausted_again and second.budget.used == 8
    assert second.computed_pairs == 0
    assert len(replayed) == len(scores)
    cands = {k: c.val for k, c in second.candidates.items()}
    assert cands == {k: c.val for k, c in first.candidates.items()}


def test_only_pairs_missing_from_the_store_are_computed(tmp_path):
    storage = _sqlite(tmp_path)
    first = _objective(storage)
    first.evaluate([Prompt("a")], first.val_order[:2])

    second = _objective(storage)
    second.evaluate([Prompt("a")], second.val_order[:3])
    assert second.computed_pairs == 1
    assert second.budget.pairs == 3


# --------------------------------------------------------------------------------- generation
def test_generations_are_stored_and_replayed(tmp_path, tokenizer):
    storage = _sqlite(tmp_path)
    lm = FakeLM(tokenizer)
    first = _objective(storage, lm=lm)
    prompts = ["write one", "write two", "write three"]
    outputs = first.generate(prompts, n=2, max_new_tokens=8, seed=5)
    assert len(lm.generate_calls) == 1 and lm.generate_calls[0] == prompts
    assert outputs == [[f"answer {i} to {p}" for i in range(2)] for p in prompts]
    tokens = sum(
        min(len(tokenizer(t, add_special_tokens=False).input_ids), 8) for o in outputs for t in o
    )
    assert first.budget.tokens == tokens and first.budget.pairs == 0

    replay_lm = FakeLM(tokenizer)
    second = _objective(storage, lm=replay_lm)
    assert second.generate(prompts, n=2, max_new_tokens=8, seed=5) == outputs
    assert replay_lm.generate_calls == []
    assert second.budget.tokens == tokens

    # Other settings are another request: not replayed.
    second.generate(prompts[:1], n=2, max_new_tokens=8, seed=6)
    assert replay_lm.generate_calls == [prompts[:1]]


def test_generation_charges_the_reserved_maximum_without_a_tokenizer():
    objective = _objective(lm=FakeLM(tokenizer=None))
    objective.generate(["a", "b"], n=3, max_new_tokens=4)
    assert objective.budget.tokens == 2 * 3 * 4


def test_a_budget_too_small_for_one_generation_never_calls_the_model(tokenizer):
    lm = FakeLM(tokenizer)
    objective = _objective(budget=15, lm=lm)
    with pytest.raises(BudgetExhausted):
        objective.generate(["a prompt"], n=2, max_new_tokens=8)  # reserves 16 > 15
    assert lm.generate_calls == []
    assert objective.budget.used == 0


def test_generation_runs_only_the_prompts_the_budget_can_reserve(tokenizer):
    lm = FakeLM(tokenizer)
    objective = _objective(budget=40, lm=lm)
    with pytest.raises(BudgetExhausted):
        objective.generate(["one", "two", "three"], n=1, max_new_tokens=16)
    assert lm.generate_calls == [["one", "two"]]
    assert 0 < objective.budget.used <= 40


# --------------------------------------------------------------------------------- the store
def test_a_study_recorded_with_another_fingerprint_is_refused(tmp_path):
    storage = _sqlite(tmp_path)
    TrialStore(storage, "shared", {"model": "a", "task": "toy"})
    TrialStore(storage, "shared", {"model": "a", "task": "toy"})  # same fingerprint: fine
    with pytest.raises(ValueError, match="--study") as info:
        TrialStore(storage, "shared", {"model": "b", "task": "toy"})
    assert "model=a" in str(info.value) and "model=b" in str(info.value)
    TrialStore(storage, "other", {"model": "b", "task": "toy"})  # another study name: fine


def test_trials_of_other_tools_in_the_study_are_ignored(tmp_path):
    storage = _sqlite(tmp_path)
    store = TrialStore(storage, "s", FINGERPRINT)
    store.study.add_trial(optuna.trial.create_trial(value=1.0))
    store.record(Prompt("x"), ["k1", "k2"], [0.5, 0.25])
    again = TrialStore(storage, "s", FINGERPRINT)
    assert again.trials_loaded == 1
    assert again.scores == {(Prompt("x").key(), "k1"): 0.5, (Prompt("x").key(), "k2"): 0.25}


def test_open_storage_kinds(tmp_path):
    assert isinstance(open_storage(None), optuna.storages.InMemoryStorage)
    assert isinstance(open_storage("memory"), optuna.storages.InMemoryStorage)
    journal = open_storage(str(tmp_path / "a" / "run.log"))
    assert isinstance(journal, optuna.storages.JournalStorage)
    db = tmp_path / "new" / "folder" / "run.db"
    assert isinstance(open_storage(f"sqlite:///{db}"), optuna.storages.RDBStorage)
    assert db.is_file()
    with pytest.raises(ValueError, match="cannot open storage"):
        open_storage("nosuchdriver://x/y")


# --------------------------------------------------------------------------------- evidence
def test_score_evidence_costs_no_budget(tmp_path):
    objective = _objective(_sqlite(tmp_path), budget=2)
    with pytest.raises(BudgetExhausted):
        objective.evaluate([Prompt("a")], objective.val_order[:3])
    assert objective.budget.used == 2
    reference = Prompt("")
    val = objective.score_evidence([reference, Prompt("a")], "val")
    test = objective.score_evidence([reference], "test")
    assert val.shape == (2, len(objective.val_pool)) and test.shape == (1, 4)
    assert objective.budget.used == 2  # evidence is outside the budget
    assert np.isfinite(val).all() and np.isfinite(test).all()
    np.testing.assert_allclose(test[0], [_score(reference, e) for e in objective.task.test])
    candidate = objective.candidates[reference.key()]
    assert len(candidate.val) == len(objective.val_pool) and len(candidate.test) == 4


class FailingEvaluator(CountingEvaluator):
    """Like CountingEvaluator, but the call numbered `fail_at` (from 0) raises KeyboardInterrupt."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at = fail_at

    def score(self, lm, prompts, examples) -> np.ndarray:
        if len(self.calls) == self.fail_at:
            self.calls.append(([], []))
            raise KeyboardInterrupt
        return super().score(lm, prompts, examples)


def test_test_evidence_is_stored_chunk_by_chunk_so_an_interrupted_run_resumes(
    tmp_path, monkeypatch
):
    monkeypatch.setattr("ape.objective.EVIDENCE_CHUNK", 3)  # the toy test split has 4 rows
    storage = _sqlite(tmp_path)
    prompts = [Prompt(""), Prompt("a")]
    first = _objective(storage, evaluator=FailingEvaluator(fail_at=1))
    with pytest.raises(KeyboardInterrupt):
        first.score_evidence(prompts, "test")
    assert first.computed_pairs == 2 * 3  # the first chunk was scored and stored

    second = _objective(storage)
    test = second.score_evidence(prompts, "test")
    assert second.computed_pairs == 2 * 1  # only the last row is scored again
    assert [len(e) for _, e in second.evaluator.calls] == [1]
    expected = [[_score(p, e) for e in second.task.test] for p in prompts]
    np.testing.assert_allclose(test, expected)


def test_val_order_is_a_seeded_permutation_and_the_pool_its_prefix():
    a, b = _objective(), _objective()
    assert a.val_order == b.val_order
    assert sorted(e.input for e in a.val_order) == sorted(e.input for e in a.task.val)
    store = TrialStore(None, "s", FINGERPRINT)
    small = Objective(_task(), FakeLM(), CountingEvaluator(), store, val_examples=4, progress=False)
    assert small.val_pool == small.val_order[:4]
    with pytest.raises(ValueError, match="val_examples"):
        Objective(_task(), FakeLM(), CountingEvaluator(), store, val_examples=0, progress=False)


class FailingLM:
    """Delegates to a real model; raises KeyboardInterrupt on generate call number `fail_at`."""

    def __init__(self, lm, fail_at: int | None = None) -> None:
        self.lm, self.name, self.tokenizer = lm, lm.name, lm.tokenizer
        self.fail_at = fail_at
        self.generate_calls: list[list[str]] = []

    def loglikelihood(self, requests, *, return_counts=False):
        return self.lm.loglikelihood(requests, return_counts=return_counts)

    def generate(self, prompts, **kwargs):
        self.generate_calls.append(list(prompts))
        if len(self.generate_calls) == self.fail_at:
            raise KeyboardInterrupt
        return self.lm.generate(prompts, **kwargs)


def test_sampled_text_after_an_interrupted_generation_matches_an_uninterrupted_run(
    tmp_path, tiny_lm
):
    """Sampling is seeded per chunk of prompts, so a resumed run draws what a whole run draws."""
    prompts = [f"Input: {w}\nOutput:" for w in ("stone", "cloud", "river", "paper", "light")]
    settings = dict(n=16, temperature=1.0, max_new_tokens=4, seed=11)  # chunks of 2 prompts
    whole_lm = FailingLM(tiny_lm)
    whole = _objective(_sqlite(tmp_path / "whole"), lm=whole_lm)
    expected = whole.generate(prompts, **settings)
    assert len(whole_lm.generate_calls) == 3 and len(expected) == 5
    assert all(len(texts) == 16 for texts in expected)

    storage = _sqlite(tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        _objective(storage, lm=FailingLM(tiny_lm, fail_at=2)).generate(prompts, **settings)
    resumed_lm = FailingLM(tiny_lm)
    resumed = _objective(storage, lm=resumed_lm)
    assert resumed.generate(prompts, **settings) == expected
    assert len(resumed_lm.generate_calls) == 2  # the first chunk was replayed
    assert resumed.budget.tokens == whole.budget.tokens


class GroupingLM:
    """`tiny_lm` with a record of its calls: `generate` and the grouped `generate_groups`."""

    def __init__(self, lm):
        self.lm, self.name, self.tokenizer = lm, lm.name, lm.tokenizer
        self.calls: list[str] = []

    def generate(self, prompts, **kwargs):
        self.calls.append("generate")
        return self.lm.generate(prompts, **kwargs)

    def generate_groups(self, groups, **kwargs):
        self.calls.append(f"groups of {len(groups)}")
        return self.lm.generate_groups(groups, **kwargs)


def test_generation_ahead_samples_the_later_calls_at_once_with_their_texts(tiny_lm):
    """A step that asks per template samples once ahead; each call then replays its chunks,
    with the texts and charges it has without the run ahead."""
    sets = [
        ([f"Input: {w}\nOutput:" for w in ("stone", "cloud", "river")], chat)
        for chat in (False, True)
    ]
    settings = dict(n=16, temperature=1.0, max_new_tokens=4, seed=11, stop=["\n"])  # 2 chunks each
    plain = _objective(lm=GroupingLM(tiny_lm))
    expected = [plain.generate(p, chat=chat, **settings) for p, chat in sets]
    assert plain.lm.calls == ["groups of 1"] * 4  # one chunk per call

    ahead = _objective(lm=GroupingLM(tiny_lm))
    ahead.generate_ahead(sets, **settings)
    assert ahead.lm.calls == ["groups of 4"] and ahead.budget.used == 0
    assert [ahead.generate(p, chat=chat, **settings) for p, chat in sets] == expected
    assert ahead.lm.calls == ["groups of 4"]  # replayed
    assert ahead.budget.tokens == plain.budget.tokens

    # Without room in the budget for all of it, nothing runs ahead.
    short = _objective(lm=GroupingLM(tiny_lm), budget=6 * 16 * 4 - 1)
    short.generate_ahead(sets, **settings)
    assert short.lm.calls == []


def test_generation_ahead_leaves_a_model_without_grouped_generation_to_the_later_calls(tokenizer):
    """A served model gains nothing from running ahead, and its later calls store each chunk as
    it comes back: nothing is sampled ahead."""
    lm = FakeLM(tokenizer)
    objective = _objective(lm=lm)
    sets = [(["one", "two"], False), (["three"], True)]
    objective.generate_ahead(sets, n=2, max_new_tokens=8, seed=5)
    assert lm.generate_calls == []
    assert objective.generate(["three"], n=2, max_new_tokens=8, seed=5, chat=True) == [
        ["answer 0 to three", "answer 1 to three"]
    ]
    assert lm.generate_calls == [["three"]]


# ----------------------------------------------------------------------------- the study's shape
def test_a_candidate_complete_on_the_pool_gets_one_complete_trial_the_studys_best(tmp_path):
    storage = _sqlite(tmp_path)
    store = TrialStore(storage, "study", FINGERPRINT)
    objective = Objective(
        _task(), FakeLM(), CountingEvaluator(), store, val_examples=4, progress=False
    )
    a, b = Prompt("a"), Prompt("b")
    objective.evaluate([a, b], objective.val_pool[:2])
    states = {t.state for t in store.study.get_trials()}
    assert states == {optuna.trial.TrialState.PRUNED}  # minibatches are never "best"
    objective.evaluate([a], objective.val_pool)
    objective.evaluate([a], objective.val_pool[:3])  # complete already: no second trial
    complete = store.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    mean = float(np.mean([_score(a, e) for e in objective.val_pool]))
    assert len(complete) == 1 and complete[0].value == pytest.approx(mean, abs=1e-12)
    assert complete[0].user_attrs["kind"] == "pool" and complete[0].user_attrs["n_examples"] == 4
    assert store.study.best_trial.number == complete[0].number
    assert objective.history[-1][1] == pytest.approx(mean, abs=1e-12)

    again = TrialStore(storage, "study", FINGERPRINT)
    replayed = Objective(
        _task(), FakeLM(), CountingEvaluator(), again, val_examples=4, progress=False
    )
    replayed.evaluate([a], replayed.val_pool)
    assert replayed.computed_pairs == 0
    assert len(again.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 1


def test_generations_live_in_a_study_of_their_own(tmp_path):
    from ape.generation_cache import GENERATIONS_ATTR

    objective = _objective(_sqlite(tmp_path))
    objective.generate(["one", "two"], n=2, max_new_tokens=4)
    attrs = objective.store.study.user_attrs
    assert not any(key.startswith("generation:") for key in attrs)
    side = optuna.load_study(study_name=attrs[GENERATIONS_ATTR], storage=_sqlite(tmp_path))
    assert [t.user_attrs["texts"] for t in side.get_trials()] == [
        [[f"answer {i} to {p}" for i in range(2)] for p in ("one", "two")]
    ]


def test_generations_stored_as_study_attributes_by_older_runs_are_replayed(tmp_path):
    from ape.storage import content_hash

    storage = _sqlite(tmp_path)
    request = {
        "model": "fake",
        "prompts": ["old"],
        "n": 1,
        "temperature": 0.0,
        "max_new_tokens": 8,
        "seed": None,
        "chat": False,
        "stop": [],
    }
    old = TrialStore(storage, "study", FINGERPRINT)
    old.study.set_user_attr(
        "generation:" + content_hash(request, 24), {"texts": [["stored"]], "tokens": 3}
    )
    lm = FakeLM()
    objective = _objective(storage, lm=lm)
    assert objective.store.generations_loaded == 1
    assert objective.generate(["old"], max_new_tokens=8) == [["stored"]]
    assert lm.generate_calls == [] and objective.budget.tokens == 3


def test_counts_are_checked_in_one_place_with_the_callers_spelling():
    from ape.budget import check_counts

    check_counts(budget=None, test_top=1)
    with pytest.raises(ValueError, match=r"^budget must be a positive number of units, got 0$"):
        check_counts(budget=0)
    with pytest.raises(ValueError, match=r"^--test-top must be positive, got -1$"):
        check_counts("--", test_top=-1)
    with pytest.raises(ValueError, match=r"^val_examples must be positive, got 0$"):
        check_counts(val_examples=0)
