"""The searcher conformance suite: every registered searcher, through the same tests.

Each searcher runs with its own small options (its `test_options` classmethod) and with the
default evaluator, or, when that does not offer what the searcher `needs`, the first registered
evaluator that does. A searcher added in a package of its own (a file and an entry point) is
tested here with no edit to this file: the last test shows it with a toy package.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from ape.evaluators.base import EVALUATORS
from ape.search.base import available_searchers, get_searcher, searcher_class
from conformance import DEFAULT_EVALUATOR, evaluator_for, same_leaderboard, small_options

import ape
from ape.capabilities import LABEL_LOGPROBS, mismatch, offers
from ape.cli import main
from ape.options import check_options, options_of
from ape.result import Result

pytestmark = pytest.mark.usefixtures("single_thread")

SEARCHERS = available_searchers()
TOY_PLUGIN = Path(__file__).parent / "toy_plugin"

# name -> (an uninterrupted run with seed 0, the pairs of each scoring call it made)
_uninterrupted: dict[str, tuple[Result, list[int]]] = {}


def run(name: str, lm, task_file, **settings) -> Result:
    """One run of searcher `name` with its small options on the tiny model, seed 0."""
    cls = searcher_class(name)
    return ape.optimize(
        task_file,
        model=lm,
        searcher=name,
        evaluator=evaluator_for(cls),
        seed=0,
        progress=False,
        **settings,
        **small_options(cls),
    )


@contextlib.contextmanager
def scoring_calls(searcher: str, stop_at: int | None = None) -> Iterator[list[int]]:
    """Record the pairs of each call to the evaluator's `score`; with `stop_at`, that call
    raises KeyboardInterrupt (Ctrl-C while a batch is being scored)."""
    evaluator = EVALUATORS.load(evaluator_for(searcher_class(searcher)))
    original = evaluator.score
    calls: list[int] = []

    def score(self, lm, prompts, examples):
        calls.append(len(prompts) * len(examples))
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return original(self, lm, prompts, examples)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluator, "score", score)
        yield calls


def uninterrupted(name: str, lm, task_file) -> tuple[Result, list[int]]:
    """The reference run of `name` (kept for the module: several tests compare with it)."""
    if name not in _uninterrupted:
        with scoring_calls(name) as calls:
            result = run(name, lm, task_file)
        _uninterrupted[name] = (result, calls)
    return _uninterrupted[name]


# --------------------------------------------------------------------------------- options
@pytest.mark.parametrize("name", SEARCHERS)
def test_every_field_has_help_a_default_and_a_supported_type(name):
    cls = searcher_class(name)
    assert check_options(cls) == []
    by_name = {option.name: option for option in options_of(cls)}
    for field, value in small_options(cls).items():
        assert field in by_name, f"{name}.test_options() names no field {field!r}"
        by_name[field].from_config(list(value) if isinstance(value, tuple) else value)
    assert get_searcher(name, **small_options(cls)).name == name


@pytest.mark.parametrize("name", SEARCHERS)
def test_help_lists_its_flags(name, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["optimize", "--searcher", name, "--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    options = options_of(searcher_class(name))
    assert (f"options of --searcher {name}" in text) == bool(options)
    for option in options:
        assert option.flag in text.split(), f"{option.flag} missing from {name}'s --help"


# --------------------------------------------------------------------------------- runs
@pytest.mark.parametrize("name", SEARCHERS)
def test_same_seed_same_leaderboard(name, tiny_lm, task_file):
    first, _ = uninterrupted(name, tiny_lm, task_file)
    assert first.leaderboard and first.best == first.leaderboard[0]
    again = run(name, tiny_lm, task_file)
    assert same_leaderboard(again.leaderboard, first.leaderboard)


@pytest.mark.parametrize("share", [0.5, 0.8])
@pytest.mark.parametrize("name", SEARCHERS)
def test_budget_cap_holds(name, share, tiny_lm, task_file):
    free, _ = uninterrupted(name, tiny_lm, task_file)
    budget = max(1, int(free.budget_used * share))
    assert budget < free.budget_used  # the cap binds
    capped = run(name, tiny_lm, task_file, budget=budget)
    assert capped.budget == budget
    assert 0 < capped.budget_used <= budget
    assert capped.leaderboard, "a budget of this size leaves room to score something"


@pytest.mark.parametrize("name", SEARCHERS)
def test_resumed_run_equals_uninterrupted_and_rescores_nothing(name, tiny_lm, task_file, tmp_path):
    free, calls = uninterrupted(name, tiny_lm, task_file)
    storage = f"sqlite:///{tmp_path / 'run.db'}"
    with scoring_calls(name, stop_at=max(1, len(calls) // 2)):
        with pytest.raises(KeyboardInterrupt) as interrupt:
            run(name, tiny_lm, task_file, storage=storage)
    resumed = run(name, tiny_lm, task_file, storage=storage)
    assert same_leaderboard(resumed.leaderboard, free.leaderboard)
    computed = free.budget_detail["pairs_computed"]
    if isinstance(interrupt.value, ape.Interrupted):  # stopped during the search, not the test
        before = interrupt.value.result.budget_detail["pairs_computed"]
        assert before + resumed.budget_detail["pairs_computed"] == computed
    assert resumed.budget_detail["pairs_computed"] <= computed

    replayed = run(name, tiny_lm, task_file, storage=storage)
    assert replayed.budget_detail["pairs_computed"] == 0
    assert same_leaderboard(replayed.leaderboard, free.leaderboard)


# --------------------------------------------------------------------------------- plugins
def test_a_searcher_the_default_evaluator_cannot_serve_gets_one_that_can():
    class NeedsLabels:
        name = "needs-labels"
        needs = frozenset({LABEL_LOGPROBS})

    assert mismatch(NeedsLabels, EVALUATORS.load(DEFAULT_EVALUATOR)) is not None
    picked = evaluator_for(NeedsLabels)
    assert offers(EVALUATORS.load(picked), LABEL_LOGPROBS)


def _suite(module) -> list[str]:
    """The tests of `module` parametrized over a plugin name."""
    return [
        name
        for name, test in vars(module).items()
        if name.startswith("test_")
        and any(
            mark.name == "parametrize" and mark.args[0] == "name"
            for mark in getattr(test, "pytestmark", [])
        )
    ]


def test_new_plugins_join_the_suites_without_edits(tmp_path):
    """A package with one searcher file, one evaluator file and their entry points, put on the
    path, is run through both suites; nothing else is edited. Its searcher needs label
    log-probs, so it also runs with an evaluator picked for it by capability."""
    import test_conformance_evaluators as evaluator_suite

    here = Path(__file__).parent
    report = tmp_path / "report.xml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TOY_PLUGIN), str(here.parent)])}
    suites = [
        str(here / "test_conformance_searchers.py"),
        str(here / "test_conformance_evaluators.py"),
    ]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "toy or counted"]
        + [f"--junitxml={report}", *suites],
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    cases = ET.parse(report).getroot().iter("testcase")
    passed = {
        c.get("name") for c in cases if not any(c.iter("failure")) and not any(c.iter("skipped"))
    }
    for test in _suite(sys.modules[__name__]):
        assert any(p.startswith(f"{test}[toy") for p in passed), f"{test} did not run the toy"
    for test in _suite(evaluator_suite):
        assert any(p.startswith(f"{test}[counted") for p in passed), f"{test} missed counted"
