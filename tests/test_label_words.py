"""Label words on a prompt, their search, and contextual calibration of the `choice` evaluator."""

from __future__ import annotations

import json

import ape.search.label_words as label_words_module
import numpy as np
import pytest
from ape.evaluators.calibration import CONTENT_FREE
from ape.evaluators.choice import ChoiceEvaluator
from ape.search.ape import APESearcher
from ape.search.label_words import (
    WordSearch,
    choose,
    merge_candidates,
    search_label_words,
    word_search_cost,
)
from ape.search.whole import WholePromptSearcher

import ape
from ape.cli import main
from ape.objective import Objective
from ape.result import Entry, Result
from ape.study import TrialStore, prompt_from_json, prompt_to_json
from ape.task import Example, Task

pytestmark = pytest.mark.usefixtures("single_thread")

GOOD = ["a fine film", "lovely acting", "a joy", "superb", "moving", "bright", "warm", "fun"]
BAD = ["dull", "a mess", "boring plot", "awful", "tedious", "flat", "weak", "cold"]


def sentiment_task() -> Task:
    rows = [Example(t, "positive") for t in GOOD] + [Example(t, "negative") for t in BAD]
    order = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    return Task(
        name="sentiment",
        train=order[:8],
        val=order[8:14],
        test=order[14:],
        labels=["negative", "positive"],
        verbalizers={"negative": "terrible", "positive": "great"},
    )


class TableLM:
    """Log-likelihoods looked up by (input line, continuation), default -10; records calls."""

    name = "table"

    def __init__(self, table: dict[tuple[str, str], float]):
        self.table = table
        self.calls: list[list[tuple[str, str]]] = []

    def loglikelihood(self, requests, *, return_counts=False):
        self.calls.append(list(requests))
        last = [(ctx.rsplit("Input: ", 1)[-1].removesuffix("\nOutput:"), c) for ctx, c in requests]
        return np.array([self.table.get(key, -10.0) for key in last])


# ----------------------------------------------------------------------------- the prompt
def test_label_words_are_part_of_the_prompt_and_round_trip():
    demos = (Example("superb", "positive"), Example("dull", "negative"))
    words = {"positive": "lovely", "negative": "awful"}
    prompt = ape.Prompt("Rate it.", demos, label_words=words)
    assert prompt == ape.Prompt("Rate it.", demos, label_words=tuple(reversed(words.items())))
    assert prompt != ape.Prompt("Rate it.", demos) and prompt.key() != ape.Prompt("Rate it.").key()
    assert ape.Prompt("x").key() == json.dumps(["x", []])  # keys of stored trials are unchanged
    assert "Input: superb\nOutput: lovely" in prompt.context("?")  # demos show the words
    assert "Output: positive" not in prompt.context("?")
    assert prompt_from_json(prompt_to_json(prompt)) == prompt
    assert "label_words" not in prompt_to_json(ape.Prompt("x"))
    entry = Entry.of(prompt, val_score=1.0, val_examples=3)
    result = Result(best=entry, leaderboard=[entry], budget_used=3, seed=0)
    again = Result.from_json(json.loads(json.dumps(result.to_json())))
    assert again.best.label_words == words and again.best.prompt == prompt


def test_the_leaderboard_shows_the_words(capsys):
    from ape.display import print_result

    words = {"negative": "awful", "positive": "superb"}
    best = Entry.of(ape.Prompt("Rate it.", label_words=words), val_score=0.9, val_examples=4)
    plain = Entry.of(ape.Prompt(""), val_score=0.5, val_examples=4)
    print_result(Result(best=best, leaderboard=[best, plain], budget_used=8, seed=0))
    out = capsys.readouterr().out
    assert "Rate it. [words: negative→awful, positive→superb]" in out
    assert "label words: negative → awful, positive → superb" in out
    assert "(no instruction)\n" in out  # no words of its own: nothing added


def test_choice_scores_the_prompt_words_over_its_verbalizers():
    task = sentiment_task()
    lm = TableLM({("superb", " lovely"): -1.0, ("dull", " awful"): -1.0})
    evaluator = ChoiceEvaluator(task.labels, task.verbalizers)
    examples = [Example("superb", "positive"), Example("dull", "negative")]
    own = ape.Prompt("", label_words={"positive": "lovely", "negative": "awful"})
    assert evaluator.score(lm, [ape.Prompt(""), own], examples).tolist() == [[0, 1], [1, 1]]
    assert {c for _, c in lm.calls[0]} == {" terrible", " great", " awful", " lovely"}
    with pytest.raises(ValueError, match="not in"):
        evaluator.score(lm, [ape.Prompt("", label_words={"neutral": "meh"})], examples)


# ----------------------------------------------------------------------------- calibration
def test_calibration_removes_the_prompts_bias():
    """The prompt says ' great' to everything (and to the content-free inputs): uncalibrated it
    gets the negative example wrong, calibrated it gets both right."""
    examples = [Example("superb", "positive"), Example("dull", "negative")]
    table = {("superb", " great"): -0.5, ("superb", " terrible"): -5.0}
    table |= {("dull", " great"): -1.0, ("dull", " terrible"): -2.0}
    table |= {(text, " great"): -1.0 for text in CONTENT_FREE}
    table |= {(text, " terrible"): -4.0 for text in CONTENT_FREE}
    raw = ChoiceEvaluator(["negative", "positive"], {"negative": "terrible", "positive": "great"})
    fixed = ChoiceEvaluator(raw.labels, raw.verbalizers, calibrate=True)
    lm = TableLM(table)
    assert raw.score(lm, [ape.Prompt("")], examples).tolist() == [[1, 0]]
    assert fixed.score(lm, [ape.Prompt("")], examples).tolist() == [[1, 1]]
    grid = fixed.label_logprobs(lm, [ape.Prompt("")], examples)
    np.testing.assert_allclose(grid[0], [[-5.0 + 4.0, -0.5 + 1.0], [-2.0 + 4.0, -1.0 + 1.0]])
    assert len(lm.calls[-1]) == 2 * (len(examples) + len(CONTENT_FREE))  # one call with the bias
    assert "calibrate=True" in repr(fixed)  # a calibrated run is a study of its own


# ----------------------------------------------------------------------------- the search
def test_choose_finds_the_separating_words_and_keeps_the_given_on_ties():
    # 4 examples, 2 classes, 3 candidates per class; only (class 0: 2, class 1: 1) separates.
    gold = np.array([0, 0, 1, 1])
    matrix = np.full((4, 2, 3), -5.0)
    matrix[:2, 0, 2] = -1.0
    matrix[2:, 1, 1] = -1.0
    best = choose(matrix, gold, [3, 3], WordSearch())
    assert best[0][:2] == ((2, 1), 1.0)
    flat = np.zeros((4, 2, 3))  # nothing to tell them apart: the given words stay
    assert choose(flat, gold, [3, 3], WordSearch())[0][0] == (0, 0)


def test_merge_keeps_source_order_and_one_owner_per_word():
    pools = merge_candidates(
        [[["terrible"], ["great"]], [["bad", "good"], ["good", "fine"]], [["fine", "awful"], []]],
        limit=3,
    )
    assert pools == [["terrible", "bad", "awful"], ["great", "fine"]]


def test_search_is_seeded_stored_and_charged(tiny_lm, tmp_path):
    task = sentiment_task()
    storage = f"sqlite:///{tmp_path / 'words.db'}"

    def objective() -> Objective:
        evaluator = ChoiceEvaluator(task.labels, task.verbalizers)
        store = TrialStore(storage, "words", {"evaluator": repr(evaluator)})
        return Objective(task, tiny_lm, evaluator, store, progress=False)

    first = objective()
    found = search_label_words(first, ape.Prompt("Rate it."))
    assert 1 <= len(found) <= WordSearch().keep
    assert all(set(a.mapping) == set(task.labels) for a in found)
    assert [a.accuracy for a in found] == sorted((a.accuracy for a in found), reverse=True)
    cost = word_search_cost(task, len(first.val_pool))
    assert 0 < first.budget.used <= cost["pairs"] + cost["tokens"]
    again = objective()  # a resumed run: the same words, nothing scored again
    assert search_label_words(again, ape.Prompt("Rate it.")) == found
    assert again.computed_pairs == 0 and again.budget.used == first.budget.used


# ----------------------------------------------------------------------------- the faces
def _accept_any_gain(monkeypatch) -> None:
    """The tiny model's words never pass the acceptance test; these tests are about where
    searched words go, so every searched assignment is accepted."""

    def accept(new, old, alpha):
        return {"wins": 0, "losses": 0, "p_value": 0.0, "alpha": alpha, "accepted": True}

    monkeypatch.setattr(label_words_module, "paired_gain", accept)


def test_optimize_searches_words_with_the_default_searcher(tiny_lm, monkeypatch):
    _accept_any_gain(monkeypatch)
    options = {**WholePromptSearcher.test_options(), "label_words": "search"}
    result = ape.optimize(
        sentiment_task(),
        model=tiny_lm,
        evaluator="choice",
        storage="memory",
        progress=False,
        calibrate=True,
        **options,
    )
    worded = [e for e in result.leaderboard if e.label_words]
    assert worded and all(set(e.label_words) == {"negative", "positive"} for e in worded)
    assert {e.origin for e in worded} & {"label words", "demo set"}
    assert result.options["label_words"] == "search" and result.options["calibrate"] is True
    assert Result.from_json(result.to_json()).best.prompt == result.best.prompt


def test_words_without_significant_evidence_leave_the_given_words(tiny_lm):
    """The tiny model's searched words are no better than chance: the default level keeps the
    task's words, and the result says which words were tried and why they were not kept."""
    result = ape.optimize(
        sentiment_task(),
        model=tiny_lm,
        searcher="ape",
        evaluator="choice",
        storage="memory",
        progress=False,
        **{**APESearcher.test_options(), "label_words": "search"},
    )
    assert all(not e.label_words for e in result.leaderboard)
    [report] = result.extras["label_word_search"]
    best = report["best"]
    assert report["selection_examples"] > 0 and best
    for tried in best:
        gain = tried["vs_given"]
        assert gain is None or not gain["accepted"]  # None: the given words themselves
        if gain is not None:
            assert gain["p_value"] >= gain["alpha"] or gain["wins"] <= gain["losses"]


@pytest.mark.parametrize("searcher", ["ape", "tpe"])
def test_ape_and_tpe_answer_with_the_words_searched_up_front(tiny_lm, searcher, monkeypatch):
    from ape.search.base import searcher_class

    _accept_any_gain(monkeypatch)
    options = {**searcher_class(searcher).test_options(), "label_words": "search"}
    result = ape.optimize(
        sentiment_task(),
        model=tiny_lm,
        searcher=searcher,
        evaluator="choice",
        storage="memory",
        progress=False,
        **options,
    )
    searched = {
        tuple(sorted(e.label_words.items()))
        for e in result.leaderboard
        if e.origin not in ("reference",)
    }
    assert len(searched) == 1 and searched != {()}


def test_a_word_search_without_label_words_is_one_line(task_file, capsys):
    with pytest.raises(ValueError, match="needs an evaluator that scores label words"):
        ape.optimize(task_file, model="no-such-model", evaluator="loglik", label_words="search")
    code = main(["optimize", str(task_file), "--label-words", "search", "--storage", "memory"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "--evaluator choice" in err
    assert main(["optimize", str(task_file), "--calibrate", "--storage", "memory"]) == 2
    assert "--calibrate is an option of --evaluator choice" in capsys.readouterr().err


def test_evaluate_uses_label_words_and_saved_results(tiny_lm, tmp_path, monkeypatch, capsys):
    task = sentiment_task()
    folder = tmp_path / "task"
    folder.mkdir()
    for split in ("train", "val", "test"):
        rows = [{"input": e.input, "output": e.output} for e in getattr(task, split)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = {"label_names": task.labels, "verbalizers": ["terrible", "great"]}
    (folder / "meta.json").write_text(json.dumps(meta))
    words = {"negative": "awful", "positive": "superb"}
    prompt = ape.Prompt("Rate it.", label_words=words)
    saved = Result(
        best=Entry.of(prompt, val_score=1.0, val_examples=1), leaderboard=[], budget_used=0, seed=0
    )
    saved.save(tmp_path / "result.json")
    monkeypatch.setattr("ape.models.load_model", lambda *a, **k: tiny_lm)
    args = ["evaluate", str(folder), "--evaluator", "choice", "--instruction", "Rate it."]
    assert (
        main(
            [
                *args,
                "--label-word",
                "negative=awful",
                "--label-word",
                "positive=superb",
                "--result",
                str(tmp_path / "result.json"),
                "--calibrate",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    scores = [
        line.split()[0] for line in table.splitlines() if "Rate it." in line or "best of" in line
    ]
    assert len(scores) == 2 and scores[0] == scores[1]  # the same prompt, scored the same
    assert "[words: negative→awful, positive→superb]" in table
    assert main([*args, "--label-word", "awful"]) == 2


def test_soft_prompts_train_and_save_with_searched_words(tiny_lm, monkeypatch, tmp_path):
    from ape.search.soft.prompt import SoftPrompt

    _accept_any_gain(monkeypatch)
    task = sentiment_task()
    result = ape.optimize(
        task,
        model=tiny_lm,
        searcher="soft",
        evaluator="choice",
        storage="memory",
        progress=False,
        label_words="search",
        init_text="Rate it.",
        steps=2,
        eval_every=1,
        batch_size=4,
    )
    start = next(e for e in result.leaderboard if e.origin == "soft: initial prompt")
    words = start.label_words
    assert words and set(words) == set(task.labels)
    assert result.artifacts["soft_prompt"].info["label_words"] == words
    # ranked on train alone, so val (where checkpoints meet the start) stays unbiased
    [report] = result.extras["label_word_search"]
    assert report["selection_examples"] == len(task.train)
    # The start still scores exactly as its text prompt, now with the searched words.
    [text_score] = ape.evaluate(
        task,
        [ape.Prompt("Rate it.", label_words=words)],
        model=tiny_lm,
        evaluator="choice",
        split="val",
    )
    assert start.val_score == pytest.approx(text_score, abs=1e-9)
    folder = tmp_path / "soft"
    result.artifacts["soft_prompt"].save(folder)
    loaded = SoftPrompt.load(folder)
    assert loaded.prompt().words == words  # `ape evaluate --soft-prompt` answers with them
