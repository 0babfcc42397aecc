"""Tests for evaluators.metrics: normalization steps, each metric, and the real task data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ape.evaluators.metrics import (
    METRICS,
    contains,
    exact_match,
    exact_set,
    f1,
    mean_score,
    normalize,
    score,
)

TASKS_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruction_induction"
TASKS = sorted(p.name for p in TASKS_DIR.glob("*/") if (p / "meta.json").exists())


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("cats and dogs", "cats dogs"),
        ("Sentence 1: a", "a"),
        ("Sentence 2:b", "b"),
        ("  padded  ", "padded"),
        ("first\nsecond", "first"),
        ("Hello. World", "hello"),
        ("MiXeD", "mixed"),
        ("well-known", "well known"),
        ('it\'s, (quoted) "x"!?', "its quoted x"),
        ("cat .", "cat"),  # trailing space left by punctuation removal is stripped
        ("", ""),
    ],
)
def test_normalize_steps(raw: str, expected: str) -> None:
    assert normalize(raw) == expected


def test_normalize_order() -> None:
    # " and " is replaced before stripping; the first line is cut before the first ".".
    assert normalize("\n a.b\nc") == "a"
    # "and" without surrounding spaces is a normal word and kept.
    assert normalize("andes and sand") == "andes sand"


def test_exact_match() -> None:
    assert exact_match("Unfortunate.", "unfortunate") == 1.0
    assert exact_match("unfortunate\nbecause ...", "unfortunate") == 1.0
    assert exact_match("The answer: unfortunate", "unfortunate") == 0.0
    assert exact_match("fortunate", "unfortunate") == 0.0


def test_contains_whole_word() -> None:
    assert contains("a big cat", "cat") == 1.0
    assert contains("Cat!", "cat") == 1.0
    assert contains("concatenate", "cat") == 0.0
    assert contains("cats", "cat") == 0.0
    assert contains("very large", "very-large") == 1.0


def test_contains_empty_answer() -> None:
    assert contains("anything", ".") == 0.0
    assert contains("", "") == 1.0


def test_f1() -> None:
    assert f1("the cat sat", "the cat sat") == 1.0
    # overlap 2 (the, cat): precision 2/3, recall 2/4 -> 2 * (1/3) / (7/6) = 4/7
    assert f1("the cat sat", "the cat ran away") == pytest.approx(4 / 7)
    # bag of tokens: overlap a:1, b:1 = 2 of 3 on each side -> 2/3
    assert f1("a a b", "a b b") == pytest.approx(2 / 3)
    assert f1("dog", "cat") == 0.0
    assert f1("", "cat") == 0.0
    assert f1("cat", "") == 0.0
    assert f1("", "...") == 1.0


def test_exact_set() -> None:
    assert exact_set("b a a", "a b") == 1.0
    assert exact_set("Apple, banana.", "banana apple") == 1.0
    assert exact_set("a b c", "a b") == 0.0
    assert exact_set("a", "b") == 0.0


def test_accuracy_only_strips_and_lowercases() -> None:
    assert METRICS["accuracy"](" Positive \n", "positive") == 1.0
    assert METRICS["accuracy"]("positive.", "positive") == 0.0


def test_score_takes_best_answer() -> None:
    assert score("Platz", ["Stelle", "platz"], "em") == 1.0
    assert score("the cat sat", ["dog", "the cat ran away", "the cat"], "f1") == pytest.approx(0.8)
    assert score("anything", [], "em") == 0.0


def test_score_unknown_metric() -> None:
    with pytest.raises(ValueError, match=r"unknown metric 'bleu'.*em, contains, f1, es, accuracy"):
        score("a", ["a"], "bleu")


def test_mean_score() -> None:
    assert mean_score(["a", "b", "c", "d"], [["a"], ["x", "b"], ["c"], ["z"]], "em") == 0.75
    with pytest.raises(ValueError):
        mean_score(["a"], [["a"], ["b"]], "em")


def _load_task(task: str) -> tuple[dict, list[dict]]:
    meta = json.loads((TASKS_DIR / task / "meta.json").read_text(encoding="utf-8"))
    lines = (TASKS_DIR / task / "test.jsonl").read_text(encoding="utf-8").splitlines()
    return meta, [json.loads(line) for line in lines if line.strip()]


@pytest.mark.skipif(not TASKS, reason=f"shared task data not found at {TASKS_DIR}")
def test_all_tasks_present() -> None:
    assert len(TASKS) == 14


@pytest.mark.skipif(not TASKS, reason=f"shared task data not found at {TASKS_DIR}")
@pytest.mark.parametrize("task", TASKS or ["<none>"])
def test_gold_scores_one_and_copy_baseline_matches(task: str) -> None:
    meta, rows = _load_task(task)
    metric = meta["metric"]
    answers = [row.get("answers", [row["output"]]) for row in rows]
    for row, row_answers in zip(rows, answers, strict=True):
        assert score(row["output"], row_answers, metric) == 1.0, row
    # The degenerate "prediction = input" baseline checks normalization against the reference.
    baseline = mean_score([row["input"] for row in rows], answers, metric)
    assert baseline == pytest.approx(meta["copy_input_baseline_test"], abs=1e-9)
