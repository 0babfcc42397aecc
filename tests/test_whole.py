"""The whole-prompt searcher: baselines in the pool, demos, budget, seed, window, evidence."""

from __future__ import annotations

import numpy as np
import pytest
from ape.search.demos import balanced_draw, draw_sets, mutations, random_demos, shown
from ape.search.whole import WholePromptSearcher

import ape
from ape.evidence import baseline_name, paired_interval
from ape.task import Example

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL_WHOLE = WholePromptSearcher.test_options()  # a run on the tiny model in seconds


def run(task_file, tiny_lm, **options):
    knobs = {**SMALL_WHOLE, **options}
    return ape.optimize(
        task_file, model=tiny_lm, searcher="whole", storage="memory", progress=False, **knobs
    )


def test_baselines_are_candidates_and_never_beat_the_winner_on_validation(task_file, tiny_lm):
    result = run(task_file, tiny_lm, instructions=("Reverse the word.",))
    origins = {e.origin for e in result.leaderboard}
    assert {"baseline: no instruction", "baseline: human", "baseline: 5 random demos"} <= origins
    pool = max(e.val_examples for e in result.leaderboard)
    baselines = [e for e in result.leaderboard if e.origin.startswith("baseline: ")]
    assert all(e.val_examples == pool for e in baselines)  # every baseline on the whole pool
    assert result.best.val_examples == pool
    assert all(result.best.val_score >= e.val_score for e in baselines)
    # demo sets and instructions were searched, not only the baselines
    assert any(e.demos and e.origin in ("demo set", "demos 1") for e in result.leaderboard)


def test_same_seed_same_leaderboard_and_budget_is_a_hard_cap(task_file, tiny_lm):
    first = run(task_file, tiny_lm, budget=400)
    again = run(task_file, tiny_lm, budget=400)
    assert first.budget_used <= 400
    assert [(e.instruction, e.demos, e.val_score) for e in first.leaderboard] == [
        (e.instruction, e.demos, e.val_score) for e in again.leaderboard
    ]


def test_max_demos_0_is_instruction_only(task_file, tiny_lm):
    result = run(task_file, tiny_lm, max_demos=0, random_demos=0)
    assert all(not e.demos for e in result.leaderboard)


def test_too_few_training_rows_for_the_demos_asked(task_file, tiny_lm):
    with pytest.raises(ValueError, match=r"max_demos=99, but the training split has \d+ rows"):
        run(task_file, tiny_lm, max_demos=99)
    # before any model loads: a missing model would be the other error
    with pytest.raises(ValueError, match=r"max_demos=99"):
        ape.optimize(task_file, model="no-such-model", max_demos=99, progress=False)


def test_candidates_past_the_window_are_skipped_with_a_note(
    task_file, tiny_lm, capsys, monkeypatch
):
    # room for the bare template and a short instruction or a demo, never for three demos
    monkeypatch.setattr(type(tiny_lm), "max_length", property(lambda self: 24))
    result = run(task_file, tiny_lm)
    assert "note: skipped a candidate" in capsys.readouterr().err
    assert all(len(e.demos) < 3 for e in result.leaderboard)  # no full demo set fit


# ------------------------------------------------------------------------------------ demos
LABELLED = [Example(f"text {i}", "pos" if i % 4 else "neg") for i in range(24)]


def test_balanced_draw_takes_classes_in_turn():
    rng = np.random.default_rng(0)
    demos = balanced_draw(LABELLED, 4, rng)
    assert sorted(d.output for d in demos) == ["neg", "neg", "pos", "pos"]
    assert len(set(demos)) == 4


def test_draw_sets_are_seeded_and_sized():
    words = [Example(f"w{i}", f"o{i}") for i in range(30)]
    a, b = draw_sets(words, 3, 5, seed=1), draw_sets(words, 3, 5, seed=1)
    assert a == b and all(len(s) == 5 for s in a)
    assert draw_sets(words, 3, 5, seed=2) != a


def test_mutations_swap_within_the_class_reorder_and_resize():
    rng = np.random.default_rng(0)
    demos = balanced_draw(LABELLED, 4, rng)
    found = mutations(demos, LABELLED, 5, rng)
    swapped, reordered, shorter, longer = found
    assert sorted(d.output for d in swapped) == sorted(d.output for d in demos)
    assert len(set(swapped) - set(demos)) == 1
    assert sorted(reordered, key=str) == sorted(demos, key=str)
    assert shorter == demos[1:] and len(longer) == 5


def test_random_demos_match_the_demos_baseline(task_file, tiny_lm):
    whole = run(task_file, tiny_lm)
    base = ape.optimize(
        task_file, model=tiny_lm, searcher="demos", storage="memory", progress=False
    )
    (baseline,) = [e for e in whole.leaderboard if e.origin == "baseline: 5 random demos"]
    assert baseline.demos == base.best.demos


def test_label_demos_show_the_scored_word():
    demos = (Example("a fine film", "positive"), Example("dull", "negative"))
    assert [d.output for d in shown(demos, {"positive": "great", "negative": "terrible"})] == [
        "great",
        "terrible",
    ]
    assert shown(demos, {}) == demos


def test_random_demos_error_names_the_sizes():
    with pytest.raises(ValueError, match="k=9 demos asked, but the training split has 3 rows"):
        random_demos(LABELLED[:3], 9, seed=0)


def test_options_are_checked():
    with pytest.raises(ValueError, match="max_demos must be 0 or more"):
        WholePromptSearcher(max_demos=-1)
    with pytest.raises(ValueError, match="length_penalty must be 0 or more"):
        ape.optimize([{"input": "a", "output": "b"}] * 4, length_penalty=-1)


# ---------------------------------------------------------------------------------- evidence
def test_paired_interval_brackets_the_mean_and_is_seeded():
    rng = np.random.default_rng(0)
    a = rng.normal(1.0, 1.0, 200)
    b = a - 0.5 + rng.normal(0, 0.1, 200)
    diff, low, high = paired_interval(a, b, seed=3)
    assert low < diff < high and low > 0.4 and high < 0.6
    assert paired_interval(a, b, seed=3) == (diff, low, high)
    assert paired_interval(b, a)[2] < 0  # the other way round lies below 0


def test_paired_interval_without_spread():
    assert paired_interval([1.0, 1.0], [0.0, 0.0]) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError):
        paired_interval([], [])


def test_baseline_names():
    assert baseline_name("baseline: no instruction") == "no instruction"
    assert baseline_name("baseline: human") == "best human instruction"
    assert baseline_name("baseline: 5 random demos") == "5 random demos"
    assert baseline_name("proposal") is None


def test_optimize_takes_rows_and_instances(tiny_lm):
    from ape.evaluators.loglik import LoglikEvaluator
    from ape.search.baselines import RandomDemos

    rows = [{"input": w, "output": w[::-1]} for w in ("stone", "cloud", "river", "green") * 6]
    result = ape.optimize(
        rows,
        model=tiny_lm,
        searcher=RandomDemos(k=2),
        evaluator=LoglikEvaluator(),
        storage="memory",
        progress=False,
        metric_evidence=False,
    )
    assert result.searcher == "demos" and result.evaluator == "loglik"
    assert len(result.best.demos) == 2
    with pytest.raises(ValueError, match="options are for a searcher named by a string"):
        ape.optimize(rows, model=tiny_lm, searcher=RandomDemos(), k=3, storage="memory")
