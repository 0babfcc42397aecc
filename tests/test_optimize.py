"""`ape.optimize()`: the Result, saving it, determinism, the budget, and resuming after a stop."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import SMALL_APE, write_task_file

import ape
import ape.api
from ape.objective import Candidate
from ape.prompt import Prompt
from ape.ranking import ranked
from ape.result import Result
from ape.task_types import DEFAULT_TEST_EXAMPLES

pytestmark = pytest.mark.usefixtures("single_thread")

KNOBS = {**SMALL_APE, "templates": "forward"}


def _optimize(task_file, lm, storage=None, **overrides):
    options = {**KNOBS, **overrides}
    return ape.optimize(
        task_file, model=lm, searcher="ape", seed=0, storage=storage, progress=False, **options
    )


@pytest.fixture(scope="module")
def uninterrupted(task_file, tiny_lm, tmp_path_factory):
    """An APE run on a fresh sqlite storage, start to finish."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        storage = f"sqlite:///{tmp_path_factory.mktemp('fresh') / 'trials.db'}"
        return _optimize(task_file, tiny_lm, storage=storage)
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------- the result
def test_result_has_the_best_prompt_its_evidence_and_the_reference(uninterrupted):
    result = uninterrupted
    best = result.best
    assert best is not None and best is not result.reference
    assert best == result.leaderboard[0]
    assert best.instruction and best.demos == []
    assert best.val_examples == 15 and math.isfinite(best.val_score)
    assert best.test_score is not None and math.isfinite(best.test_score)
    timings = result.timings
    assert 0 < timings["search_s"] and 0 < timings["evidence_s"]
    assert 0 < timings["metric_evidence_s"] and "load_s" not in timings  # a model object given
    phases = ("search_s", "evidence_s", "metric_evidence_s")
    assert sum(timings[p] for p in phases) <= timings["total_s"]
    machine = result.machine
    assert machine["device"] == "cpu" and machine["cpu"] and machine["torch_threads"] >= 1

    ref = result.reference
    assert ref is not None and ref.instruction == "" and ref.origin == "reference"
    assert ref.val_examples == 15 and ref.test_score is not None
    assert all(e.instruction for e in result.leaderboard)  # the reference is evidence, not a rival

    # Sorted as ranked(): most validation examples first, then by mean score.
    keys = [(-e.val_examples, -e.val_score) for e in result.leaderboard]
    assert keys == sorted(keys)
    assert len(result.leaderboard) > 3
    # The test_top (3) best are scored on test, the rest are not.
    assert [e.test_score is not None for e in result.leaderboard] == [True] * 3 + [False] * (
        len(result.leaderboard) - 3
    )
    for text in ("stone", "a b c"):
        assert best.render(text) == ape.Prompt(best.instruction).render(text)
        assert best.render(text).endswith(f"Input: {text}\nOutput:")

    assert (result.task, result.model, result.searcher, result.evaluator) == (
        "words",
        "tiny",
        "ape",
        "loglik",
    )
    assert result.options["num_subsamples"] == 2 and result.seed == 0
    detail = result.budget_detail
    assert result.budget_used == detail["pairs"] + detail["tokens"] > 0
    assert detail["pairs_computed"] > 0
    assert result.budget is None and not result.stopped_by_budget and not result.interrupted
    assert "optuna" in result.versions and result.timings["total_s"] > 0


def test_ranked_puts_fully_evaluated_candidates_first():
    full = Candidate(Prompt("full"), "x", val={"a": -2.0, "b": -2.0})
    partial = Candidate(Prompt("partial"), "x", val={"a": 0.0})  # better mean, fewer examples
    better = Candidate(Prompt("better"), "x", val={"a": -1.0, "b": -1.0})
    unscored = Candidate(Prompt("unscored"), "x")
    order = ranked([partial, unscored, full, better])
    assert [c.prompt.instruction for c in order] == ["better", "full", "partial"]


def test_save_and_load_round_trip(uninterrupted, tmp_path):
    path = uninterrupted.save(tmp_path / "runs" / "result.json")
    assert path.is_file() and not (tmp_path / "runs" / "result.json.partial").exists()
    data = json.loads(path.read_text())
    assert {"best", "leaderboard", "budget_used", "seed"} <= set(data)
    assert {"instruction", "val_score", "test_score"} <= set(data["best"])
    assert data["best"]["instruction"] == uninterrupted.best.instruction
    assert data["best"]["test_score"] == uninterrupted.best.test_score
    assert len(data["leaderboard"]) == len(uninterrupted.leaderboard)
    assert data["budget_used"] == uninterrupted.budget_used and data["seed"] == 0
    assert data["reference"]["instruction"] == ""

    loaded = Result.load(path)
    assert loaded == uninterrupted
    assert loaded.best.render("x") == uninterrupted.best.render("x")


def test_nan_scores_are_saved_as_null(tmp_path):
    entry = ape.Entry("i", val_score=float("nan"), val_examples=0)
    result = Result(best=entry, leaderboard=[entry], budget_used=1, seed=0)
    path = result.save(tmp_path / "r.json")
    assert "NaN" not in path.read_text()
    assert Result.load(path).best.val_score is None


class _Weights:
    def __init__(self, text: str):
        self.text = text

    def save(self, directory):
        (directory / "weights.txt").write_text(self.text)


def test_artifacts_are_saved_beside_the_result_and_found_again(tmp_path):
    entry = ape.Entry("i", val_score=1.0, val_examples=1)
    result = Result(best=entry, leaderboard=[entry], budget_used=1, seed=0)
    result.artifacts["policy"] = _Weights("w")
    result.extras["curve"] = [[1, 0.5], [2, 0.75]]
    path = result.save(tmp_path / "run.json")
    loaded = Result.load(path)
    assert loaded.extras["curve"] == [[1, 0.5], [2, 0.75]]
    assert (loaded.file("policy", path) / "weights.txt").read_text() == "w"
    assert loaded.file("policy", path).parent.name == "run.files"
    with pytest.raises(KeyError, match="no saved 'soft'"):
        loaded.file("soft", path)


def test_load_explains_a_bad_file(tmp_path):
    with pytest.raises(ValueError, match="no such result file"):
        Result.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"best": \n')
    with pytest.raises(ValueError, match="bad.json:2: not valid JSON"):
        Result.load(bad)
    other = tmp_path / "other.json"
    other.write_text('{"nothing": 1}')
    with pytest.raises(ValueError, match="not an ape result"):
        Result.load(other)


# --------------------------------------------------------------------------------- determinism
def test_the_same_seed_gives_the_same_result(uninterrupted, task_file, tiny_lm):
    again = _optimize(task_file, tiny_lm)  # in memory this time
    assert again.best.instruction == uninterrupted.best.instruction
    assert [e.instruction for e in again.leaderboard] == [
        e.instruction for e in uninterrupted.leaderboard
    ]
    np.testing.assert_allclose(
        [e.val_score for e in again.leaderboard],
        [e.val_score for e in uninterrupted.leaderboard],
        rtol=1e-6,
    )
    assert again.budget_used == uninterrupted.budget_used


def test_test_examples_scores_the_finalists_on_a_seeded_sample(task_file, tiny_lm):
    result = ape.optimize(
        task_file, model=tiny_lm, searcher="none", progress=False, test_examples=4, seed=2
    )
    assert result.test_examples == 4
    rows = ape.load_task(task_file, seed=2).sample_test(4, seed=2).test
    scores = ape.api.make_evaluator("loglik", ape.load_task(task_file)).score(
        tiny_lm, [Prompt("")], rows
    )
    assert result.best.test_score == pytest.approx(float(scores.mean()), abs=1e-6)
    with pytest.raises(ValueError, match="test_examples must be positive"):
        ape.optimize(task_file, model=tiny_lm, searcher="none", progress=False, test_examples=0)


def test_a_large_test_split_is_sampled_by_default_and_all_keeps_every_row(tmp_path, tiny_lm):
    words = [f"w{i}x" for i in range(DEFAULT_TEST_EXAMPLES + 30)]
    write_task_file(tmp_path / "train.jsonl", words[:20])
    write_task_file(tmp_path / "test.jsonl", words[20:])
    sampled = ape.optimize(tmp_path, model=tiny_lm, searcher="none", progress=False)
    assert (sampled.test_examples, sampled.test_split_rows) == (DEFAULT_TEST_EXAMPLES, 1010)
    every = ape.optimize(
        tmp_path, model=tiny_lm, searcher="none", progress=False, test_examples=None
    )
    assert (every.test_examples, every.test_split_rows) == (1010, 1010)


# --------------------------------------------------------------------------------- the budget
def test_a_budget_caps_the_run(task_file, tiny_lm):
    result = _optimize(task_file, tiny_lm, budget=100)
    assert result.budget == 100
    assert 0 < result.budget_used <= 100
    assert result.stopped_by_budget
    assert result.best is not None and result.best.test_score is not None


def test_a_budget_too_small_to_score_anything_is_an_error(task_file, tiny_lm):
    with pytest.raises(ValueError, match="nothing was scored"):
        _optimize(task_file, tiny_lm, budget=10)  # one proposal prompt reserves 3 * 8 tokens


# --------------------------------------------------------------------------------- resuming
class _Evaluators:
    """Wraps the evaluators optimize() makes: counts score() calls, can stop at call `stop_at`."""

    def __init__(self, monkeypatch, stop_at: int | None = None) -> None:
        self.calls = 0
        self.stop_at = stop_at
        make = ape.api.make_evaluator

        def counted(*args, **kwargs):
            return _Counted(make(*args, **kwargs), self)

        monkeypatch.setattr(ape.api, "make_evaluator", counted)


class _Counted:
    def __init__(self, inner, counter: _Evaluators) -> None:
        self.inner, self.counter, self.name = inner, counter, inner.name

    def __repr__(self) -> str:
        return repr(self.inner)  # part of the study's fingerprint: the same study is reopened

    def score(self, lm, prompts, examples):
        self.counter.calls += 1
        if self.counter.calls == self.counter.stop_at:
            raise KeyboardInterrupt
        return self.inner.score(lm, prompts, examples)


def test_a_run_resumed_after_ctrl_c_ends_like_an_uninterrupted_one(
    uninterrupted, task_file, tiny_lm, tmp_path, monkeypatch
):
    storage = f"sqlite:///{tmp_path / 'trials.db'}"
    counter = _Evaluators(monkeypatch, stop_at=3)  # in the bandit rounds after resampling
    with pytest.raises(ape.Interrupted) as info:
        _optimize(task_file, tiny_lm, storage=storage)
    assert counter.calls == 3
    partial = info.value.result
    assert isinstance(info.value, KeyboardInterrupt)
    assert partial.interrupted and partial.best is not None
    assert all(e.test_score is None for e in partial.leaderboard)  # test is never scored
    assert 0 < partial.budget_used < uninterrupted.budget_used

    monkeypatch.undo()
    resumed = _optimize(task_file, tiny_lm, storage=storage)
    assert not resumed.interrupted
    assert resumed.best.instruction == uninterrupted.best.instruction
    assert [e.instruction for e in resumed.leaderboard] == [
        e.instruction for e in uninterrupted.leaderboard
    ]
    assert resumed.best.test_score == pytest.approx(uninterrupted.best.test_score, rel=1e-6)
    assert resumed.budget_used == uninterrupted.budget_used  # logical charging
    computed = resumed.budget_detail["pairs_computed"]
    assert 0 < computed < uninterrupted.budget_detail["pairs_computed"]


def test_a_finished_run_replays_without_computing(uninterrupted, task_file, tiny_lm):
    storage = uninterrupted.storage
    again = _optimize(task_file, tiny_lm, storage=storage)
    assert again.budget_detail["pairs_computed"] == 0
    assert again.best == uninterrupted.best
    assert "generate_s" not in again.timings  # every proposal was replayed


def _trials(db) -> int:
    """Completed trials in an Optuna sqlite file that another process is writing (0 if none)."""
    try:
        uri = f"file:{db}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=0.2)) as con:
            return con.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_result(
    task_file, tiny_model_dir, tmp_path
):
    """The issue's must-show: kill -9 mid-run, rerun the same command, get the same answer."""
    knobs = {**KNOBS, "num_proposals": 4, "resample_rounds": 2, "variations": 3}
    db = tmp_path / "killed.db"
    out = tmp_path / "killed.json"
    command = [
        *(sys.executable, "-m", "ape", "optimize", str(task_file), "--seed", "0", "--quiet"),
        *("--searcher", "ape", "--model", str(tiny_model_dir)),
        *("--storage", f"sqlite:///{db}", "--out", str(out)),
        *(f"--{key.replace('_', '-')}={value}" for key, value in knobs.items()),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    log = tmp_path / "killed.log"

    with log.open("w") as sink:
        killed = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=sink, stderr=sink)
    deadline = time.monotonic() + 120
    while killed.poll() is None and _trials(db) < 3:
        if time.monotonic() > deadline:
            killed.kill()
            pytest.fail("no trial was stored within 120 s")
        time.sleep(0.01)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    if killed.returncode != -signal.SIGKILL:
        pytest.fail(
            f"the run ended (exit {killed.returncode}) before it was killed; make it longer:\n"
            + log.read_text()[-2000:]
        )
    stored_at_kill = _trials(db)
    assert stored_at_kill >= 3 and not out.exists()

    with log.open("w") as sink:  # the same command again, to completion
        resumed = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=sink, stderr=sink)
    # Meanwhile, the uninterrupted run on a storage of its own.
    fresh_db = tmp_path / "fresh.db"
    reference = ape.optimize(
        task_file,
        model=ape.load_model(tiny_model_dir),
        searcher="ape",
        seed=0,
        storage=f"sqlite:///{fresh_db}",
        progress=False,
        **knobs,
    )
    assert resumed.wait(timeout=120) == 0, log.read_text()[-2000:]
    assert "resuming study" not in log.read_text()  # --quiet

    after = Result.load(out)
    assert stored_at_kill < _trials(fresh_db)  # it was killed mid-run
    assert after.best.instruction == reference.best.instruction
    assert [e.instruction for e in after.leaderboard] == [
        e.instruction for e in reference.leaderboard
    ]
    assert after.budget_used == reference.budget_used
    assert 0 < after.budget_detail["pairs_computed"] < reference.budget_detail["pairs_computed"]


# --------------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_ape_on_the_embedded_model_beats_no_instruction():
    """The main job on the embedded 135M model: the found instruction beats the bare template."""
    result = ape.optimize(
        "antonyms",
        model=ape.load_model(),
        searcher="ape",
        seed=0,
        progress=False,
        num_subsamples=2,
        num_proposals=4,
        rounds=3,
        resample_rounds=0,
        finalists=2,
        val_examples=20,
        test_top=1,
    )
    assert result.best is not None and result.reference is not None
    assert result.best.val_examples == result.reference.val_examples == 20
    assert result.best.val_score > result.reference.val_score
    assert result.best.test_score is not None


def test_a_model_given_by_path_has_its_load_time(task_file, tiny_model_dir):
    result = _optimize(task_file, str(tiny_model_dir), budget=60, metric_evidence=False)
    assert 0 < result.timings["load_s"] < result.timings["total_s"]
