"""The `ape evaluate` command and `ape.evaluate()` as a user runs them."""

from __future__ import annotations

import json

import pytest

import ape
from ape.cli import main


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("ape: error: ")
    return err


def test_missing_data_file_exits_2_with_one_line(capsys, tmp_path):
    assert main(["evaluate", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl" in _one_line_error(capsys)


def test_bad_row_exits_2_naming_file_line_and_field(capsys, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"input": "a", "output": "b"}\n{"input": "c"}\n')
    assert main(["evaluate", str(data)]) == 2
    assert "data.jsonl:2: missing field 'output'" in _one_line_error(capsys)


def test_unknown_evaluator_exits_2_before_loading_a_model(capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model must not be loaded for a bad evaluator name")

    monkeypatch.setattr("ape.models.load_model", fail)
    assert main(["evaluate", "antonyms", "--evaluator", "bogus"]) == 2
    assert "unknown evaluator 'bogus'" in _one_line_error(capsys)


def test_missing_model_exits_2(capsys):
    assert main(["evaluate", "antonyms", "--model", "/no/such/model"]) == 2
    assert "/no/such/model" in _one_line_error(capsys)


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ["--instruction", "--evaluator", "--split", "--model", "--seed", "--test"]:
        assert option in text


def test_evaluate_with_the_tiny_model_matches_the_evaluator(tiny_lm, tmp_path):
    data = tmp_path / "data.jsonl"
    rows = [{"input": f"word{i}", "output": f"drow{i}"} for i in range(12)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = ape.load_task(data, seed=3)
    scores = ape.evaluate(task, ["Reverse the word.", ""], model=tiny_lm, split="test")
    pairs = ape.Prompt("Reverse the word.").requests(task.test)
    sums, counts = tiny_lm.loglikelihood(pairs, return_counts=True)
    assert scores[0] == pytest.approx(float((sums / counts).mean()), abs=1e-9)
    assert len(scores) == 2 and scores[0] != scores[1]


@pytest.mark.slow
def test_demo_command_ranks_instructions_above_no_instruction(capsys):
    """The README's main job: on the embedded model, real instructions beat none."""
    code = main(
        [
            "evaluate",
            "antonyms",
            "--instruction",
            "Write the opposite of the word.",
            "--instruction",
            "",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line[:1] in "-0123456789" and "  " in line]
    scores = {line.split("  ", 1)[1].strip(): float(line.split()[0]) for line in lines[1:]}
    assert scores["Write the opposite of the word."] > scores["(no instruction)"]
