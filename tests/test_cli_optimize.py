"""`ape optimize` and `ape show` as a user runs them: flags, exit codes, output files."""

from __future__ import annotations

import json

import pytest

import ape.api
from ape.cli import _searcher_arguments, build_parser, main
from ape.result import Entry, Result

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Run every command in a temporary folder: the default --out and --storage are relative."""
    monkeypatch.chdir(tmp_path)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("ape: error: ")
    return err


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command loads a model (bad input must be caught before that)."""

    def fail(*args, **kwargs):
        raise AssertionError("the model must not be loaded for bad input")

    monkeypatch.setattr("ape.models.load_model", fail)


# --------------------------------------------------------------------------------- help
def test_optimize_help_lists_the_run_and_searcher_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["optimize", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in [
        "--searcher",
        "--budget",
        "--storage",
        "--study",
        "--out",
        "--val-examples",
        "--test-top",
        "--quiet",
        # searcher options, generated from the searchers' fields
        "--num-subsamples",
        "--num-proposals",
        "--resample-rounds",
        "--proposal-model",
        "--instruction",
        "--k",
    ]:
        assert flag in text, flag
    assert "options of --searcher ape" in text and "options of --searcher demos" in text


def test_help_after_a_searcher_shows_its_options_with_its_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["optimize", "d.jsonl", "--searcher", "tpe", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "options of --searcher tpe" in text and "options of --searcher ape" not in text
    assert "--n-startup-trials" in text and "--resample-rounds" not in text
    shared = " ".join(text.split("--num-subsamples N")[-1].split("--num-demos")[0].split())
    assert shared.endswith("(default: 3)")  # tpe's own default, not ape's 5


def test_an_optional_searcher_option_takes_none():
    args = build_parser().parse_args(["optimize", "d.jsonl", "--proposal-model", "none"])
    assert _searcher_arguments(args) == {"proposal_model": None}
    args = build_parser().parse_args(["optimize", "d.jsonl", "--proposal-model", "gpt2"])
    assert _searcher_arguments(args) == {"proposal_model": "gpt2"}


def test_show_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["show", "--help"])
    assert exit_info.value.code == 0
    assert "--top" in capsys.readouterr().out


def test_searcher_flags_survive_building_the_parser_twice():
    build_parser()
    args = build_parser().parse_args(
        ["optimize", "d.jsonl", "--searcher", "given", "--instruction", "a", "--instruction", "b c"]
    )
    assert _searcher_arguments(args) == {"instructions": ("a", "b c")}
    args = build_parser().parse_args(["optimize", "d.jsonl", "--searcher", "none", "--k", "2"])
    with pytest.raises(ValueError, match=r"^--k is an option of --searcher demos, not none$"):
        _searcher_arguments(args)
    args = build_parser().parse_args(["optimize", "d.jsonl", "--num-subsamples", "2", "--c", "0.5"])
    assert _searcher_arguments(args) == {"num_subsamples": 2, "c": 0.5}


# --------------------------------------------------------------------------------- bad input
def test_zero_budget_exits_2(capsys, task_file, no_model):
    assert main(["optimize", str(task_file), "--budget", "0"]) == 2
    assert "--budget must be a positive" in _one_line_error(capsys)


@pytest.mark.parametrize("flag", ["--test-examples", "--test-top", "--val-examples"])
def test_a_zero_count_exits_2(capsys, task_file, no_model, flag):
    assert main(["optimize", str(task_file), flag, "0"]) == 2
    assert f"{flag} must be positive, got 0" in _one_line_error(capsys)


def test_unknown_searcher_exits_2(capsys, task_file, no_model):
    assert main(["optimize", str(task_file), "--searcher", "bogus"]) == 2
    assert "unknown searcher 'bogus'" in _one_line_error(capsys)


def test_an_option_of_another_searcher_exits_2(capsys, task_file, no_model):
    assert main(["optimize", str(task_file), "--searcher", "none", "--k", "3"]) == 2
    err = _one_line_error(capsys)
    assert "--k is an option of --searcher demos" in err and "not none" in err


def test_a_bad_searcher_option_value_exits_2(capsys, task_file, no_model):
    assert main(["optimize", str(task_file), "--minibatch", "0"]) == 2
    assert "minibatch must be positive" in _one_line_error(capsys)


def test_missing_data_file_exits_2(capsys, tmp_path, no_model):
    assert main(["optimize", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl" in _one_line_error(capsys)
    assert not (tmp_path / "ape-runs").exists()


def test_show_of_a_missing_result_exits_2(capsys, tmp_path):
    assert main(["show", str(tmp_path / "missing.json")]) == 2
    assert "no such result file" in _one_line_error(capsys)


# --------------------------------------------------------------------------------- a real run
def test_optimize_then_show(capsys, task_file, tiny_model_dir, tmp_path):
    out = tmp_path / "out" / "result.json"
    code = main(
        [
            "optimize",
            str(task_file),
            "--model",
            str(tiny_model_dir),
            "--searcher",
            "given",
            "--instruction",
            "Reverse the word.",
            "--instruction",
            "Spell the word backwards.",
            "--storage",
            f"sqlite:///{tmp_path / 'trials.db'}",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    best = data["best"]["instruction"]
    assert best in ("Reverse the word.", "Spell the word backwards.")
    assert data["searcher"] == "given" and data["options"]["instructions"] == [
        "Reverse the word.",
        "Spell the word backwards.",
    ]
    assert {e["instruction"] for e in data["leaderboard"]} == {
        "Reverse the word.",
        "Spell the word backwards.",
    }
    header = next(line for line in printed.splitlines() if line.startswith("#"))
    assert header.split() == ["#", "val", "n", "test", "metric", "tokens", "origin", "prompt"]
    assert f"best prompt: {best}" in printed
    assert "(no instruction:" in printed
    assert f"saved {out}" in printed
    assert (tmp_path / "trials.db").is_file() and not (tmp_path / "ape-runs").exists()

    assert main(["show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert f"best prompt: {best}" in shown
    assert "Spell the word backwards." in shown and "Reverse the word." in shown


def test_test_examples_scores_a_seeded_sample_of_the_test_split(
    capsys, task_file, tiny_model_dir, tmp_path
):
    out = tmp_path / "result.json"
    args = ["optimize", str(task_file), "--model", str(tiny_model_dir), "--searcher", "none"]
    args += ["--storage", "memory", "--out", str(out), "--quiet", "--test-examples", "4"]
    assert main(args) == 0
    assert "on 4 of 10 test rows (a seeded sample" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert (data["test_examples"], data["test_split_rows"]) == (4, 10)


def test_test_examples_all_or_a_number(capsys, task_file, tiny_model_dir, tmp_path):
    out = tmp_path / "result.json"
    args = ["optimize", str(task_file), "--model", str(tiny_model_dir), "--searcher", "none"]
    args += ["--storage", "memory", "--out", str(out), "--quiet", "--test-examples"]
    assert main([*args, "all"]) == 0
    assert "on 10 test rows\n" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*args, "most"])
    assert "--test-examples: a number of rows or 'all', not 'most'" in capsys.readouterr().err


# --------------------------------------------------------------------------------- Ctrl-C
def _partial() -> Result:
    entry = Entry("Reverse the word.", val_score=-3.0, val_examples=5, origin="given")
    return Result(
        best=entry, leaderboard=[entry], budget_used=5, seed=0, task="words", interrupted=True
    )


def test_ctrl_c_exits_130_and_saves_the_partial_result(
    capsys, monkeypatch, task_file, tiny_lm, tmp_path
):
    def interrupted(*args, **kwargs):
        raise ape.api.Interrupted(_partial())

    monkeypatch.setattr("ape.models.load_model", lambda *a, **k: tiny_lm)
    monkeypatch.setattr(ape.api, "optimize", interrupted)  # _run_optimize imports it at call time
    out = tmp_path / "partial.json"
    db = f"sqlite:///{tmp_path / 'trials.db'}"
    assert main(["optimize", str(task_file), "--out", str(out), "--storage", db]) == 130
    err = capsys.readouterr().err
    assert f"partial result saved to {out}" in err
    assert "run the same command again to resume" in err
    saved = Result.load(out)
    assert saved.interrupted and saved.best.instruction == "Reverse the word."


def test_ctrl_c_outside_the_search_exits_130(capsys, monkeypatch, task_file):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("ape.models.load_model", interrupt)
    assert main(["optimize", str(task_file)]) == 130
    assert capsys.readouterr().err.strip() == "ape: interrupted"
