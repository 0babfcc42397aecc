"""`ape bench`: the grid's result files, the summary and plots, skipping finished runs on a rerun,
Ctrl-C, and config errors (exit 2, one line naming the file and the key)."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
from conftest import WORDS, write_task_file

import ape.api
from ape import bench
from ape.cli import main
from ape.device import machine_line
from ape.models import load_model
from ape.result import Result

# APE at its smallest: one subsample, three proposals, one bandit stage, one finalist.
APE_KNOBS = dict(
    num_subsamples=1,
    num_proposals=3,
    rounds=1,
    resample_rounds=0,
    finalists=1,
    max_new_tokens=8,
    templates="forward",
)
BUDGET = 80
POOL = 15  # validation examples of a 40-row task file


def _write_config(path, **settings):
    path.write_text(json.dumps(settings, indent=2) + "\n")
    return path


def _grid(tmp_path, model_dir, **overrides):
    """Two tasks (reverse, uppercase) x two searchers (none, ape) x two seeds."""
    write_task_file(tmp_path / "reverse.jsonl")
    rows = [json.dumps({"input": w, "output": w.upper()}) for w in WORDS]
    (tmp_path / "upper.jsonl").write_text("\n".join(rows) + "\n")
    settings = {
        "tasks": ["reverse.jsonl", "upper.jsonl"],  # relative to the config's folder
        "searchers": ["none", {"name": "ape", "options": APE_KNOBS}],
        "seeds": [0, 1],
        "budget": BUDGET,
        "model": str(model_dir),
        **overrides,
    }
    return _write_config(tmp_path / "grid.json", **settings)


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory):
    """The grid, run once through the CLI: (config path, output folder)."""
    directory = tmp_path_factory.mktemp("bench")
    config = _grid(directory, tiny_model_dir)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["bench", str(config), "--quiet"]) == 0
    finally:
        torch.set_num_threads(before)
    return config, directory / "grid-results"


RUN_NAMES = [
    f"{task}-{searcher}-seed{seed}"
    for task in ("reverse", "upper")
    for searcher in ("none", "ape")
    for seed in (0, 1)
]


def test_every_run_writes_a_result_with_its_score_against_budget_curve(finished):
    _, out = finished
    assert sorted(p.stem for p in (out / "runs").glob("*.json")) == sorted(RUN_NAMES)
    for name in RUN_NAMES:
        result = Result.load(out / "runs" / f"{name}.json")
        task, searcher, seed = name.split("-")
        assert (result.task, result.searcher, result.seed) == (task, searcher, int(seed[4:]))
        assert result.budget == BUDGET and 0 < result.budget_used <= BUDGET
        assert result.best is not None and result.best.test_score is not None
        budgets = [b for b, _ in result.history]
        assert budgets == sorted(set(budgets)) and budgets[-1] <= result.budget_used
        # The curve ends at the validation score of the prompt the run returned.
        assert result.history[-1][1] == pytest.approx(result.best.val_score, abs=1e-9)
        if searcher == "none":  # one call: the empty prompt on the whole pool
            assert result.history == [[POOL, pytest.approx(result.best.val_score)]]
            assert result.budget_used == POOL
        else:
            assert result.options == APE_KNOBS and budgets[0] > POOL  # proposals cost tokens


def test_a_run_replayed_from_its_study_rebuilds_the_same_history(finished, single_thread):
    config = bench.load_config(finished[0])
    run = next(r for r in bench.plan(config) if r.name == "upper-ape-seed1")
    again = ape.api.optimize(
        run.source,
        model=load_model(config.model),
        searcher="ape",
        budget=BUDGET,
        seed=1,
        storage=config.storage,
        study=run.name,
        progress=False,
        **APE_KNOBS,
    )
    assert again.budget_detail["pairs_computed"] == 0  # all replayed from the bench's storage
    assert again.history == Result.load(run.path).history


def test_summary_table_and_json_hold_mean_and_std_across_seeds_and_wins(finished):
    config, out = finished
    data = json.loads((out / "summary.json").read_text())
    assert data["budget"] == BUDGET and data["seeds"] == [0, 1] and data["missing"] == []
    assert [(r["task"], r["searcher"]) for r in data["rows"]] == [
        ("reverse", "none"),
        ("reverse", "ape"),
        ("upper", "none"),
        ("upper", "ape"),
    ]
    markdown = (out / "summary.md").read_text()
    for row in data["rows"]:
        results = [
            Result.load(out / "runs" / f"{row['task']}-{row['searcher']}-seed{s}.json")
            for s in (0, 1)
        ]
        tests = [r.best.test_score for r in results]
        assert row["test_mean"] == pytest.approx(np.mean(tests))
        assert row["test_std"] == pytest.approx(np.std(tests, ddof=1))
        assert row["val_mean"] == pytest.approx(np.mean([r.best.val_score for r in results]))
        assert row["budget_used_mean"] == np.mean([r.budget_used for r in results])
        walls = [r.timings["total_s"] for r in results]
        assert row["wall_s_median"] == pytest.approx(np.median(walls))
        assert [run["seed"] for run in row["runs"]] == [0, 1]
        test_cell = f"{row['test_mean']:.4f} ± {row['test_std']:.4f}"
        line = next(
            x
            for x in markdown.splitlines()
            if x.startswith(f"| {row['task']} | {row['searcher']} |")
        )
        assert test_cell in line and line.endswith("| 2 |")
        winner = row["searcher"] in data["wins"][row["task"]]
        assert (f"**{test_cell}**" in line) == winner
    for task in ("reverse", "upper"):
        best = max((r for r in data["rows"] if r["task"] == task), key=lambda r: r["test_mean"])
        assert data["wins"][task] == [best["searcher"]]
    assert sum(data["win_counts"].values()) == 2
    assert "| searcher | wins | tasks |" in markdown
    assert data["machines"] and data["machines"][0]["device"] == "cpu"
    assert f"Timed on: {machine_line(data['machines'][0])}." in markdown
    curves = data["curves"]["reverse"]
    assert set(curves["searchers"]) == {"none", "ape"}
    assert len(curves["searchers"]["ape"]["mean"]) == len(curves["budget"])


def test_plots_are_png_files_one_per_task(finished):
    pytest.importorskip("matplotlib")
    _, out = finished
    for task in ("reverse", "upper"):
        png = out / "plots" / f"{task}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{task}](plots/{task}.png)" in (out / "summary.md").read_text()


def test_a_second_invocation_skips_finished_runs(finished, monkeypatch, capsys):
    config, out = finished
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}

    def no_model(*args, **kwargs):
        raise AssertionError("nothing is left to run, so no model should load")

    monkeypatch.setattr("ape.models.load_model", no_model)
    assert main(["bench", str(config), "--quiet"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == stamps
    assert "| reverse | ape |" in capsys.readouterr().out


def test_changed_settings_refuse_stale_results(finished, capsys):
    config, _ = finished
    settings = json.loads(config.read_text())
    changed = _write_config(config.with_name("changed.json"), **settings, out="grid-results")
    changed.write_text(changed.read_text().replace(f'"budget": {BUDGET}', '"budget": 90'))
    assert main(["bench", str(changed), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "budget=80" in err and "budget=90" in err
    assert "changed.json" in err


def test_ctrl_c_exits_130_keeping_finished_runs_and_a_rerun_continues(
    tiny_model_dir, tmp_path, monkeypatch, capsys, single_thread
):
    config = _grid(tmp_path, tiny_model_dir, searchers=["none"], tasks=["reverse.jsonl"])
    real, calls = ape.api.optimize, []

    def interrupted_second(*args, **kwargs):
        calls.append(kwargs["seed"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ape.api, "optimize", interrupted_second)
    assert main(["bench", str(config), "--quiet"]) == 130
    assert "run the same command again" in capsys.readouterr().err
    runs = tmp_path / "grid-results" / "runs"
    assert sorted(p.name for p in runs.glob("*.json")) == ["reverse-none-seed0.json"]
    assert not (tmp_path / "grid-results" / "summary.md").exists()

    assert main(["bench", str(config), "--quiet"]) == 0
    assert calls == [0, 1, 1]  # the rerun ran only the missing run
    assert sorted(p.name for p in runs.glob("*.json")) == [
        "reverse-none-seed0.json",
        "reverse-none-seed1.json",
    ]


def test_summary_without_matplotlib_warns_in_one_line_and_skips_plots(
    finished, tmp_path, monkeypatch, capsys
):
    config_path, out = finished
    config = bench.load_config(config_path)
    config.out = tmp_path / "copy"
    (config.out / "runs").mkdir(parents=True)
    for result in (out / "runs").glob("*.json"):
        (config.out / "runs" / result.name).write_bytes(result.read_bytes())
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    summary = bench.summarize(config)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "matplotlib" in err
    assert not (config.out / "plots").exists() and "plots/" not in summary.markdown
    assert (config.out / "summary.md").read_text() == summary.markdown


def test_step_curve_holds_each_value_until_the_next_point():
    values = bench.step([[10, 1.0], [20, 3.0]], np.array([0, 10, 15, 20, 30]))
    assert math.isnan(values[0]) and values[1:].tolist() == [1.0, 1.0, 3.0, 3.0]


def test_results_saved_before_history_load_with_an_empty_one(finished, tmp_path):
    _, out = finished
    data = json.loads((out / "runs" / "reverse-none-seed0.json").read_text())
    del data["history"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert Result.load(tmp_path / "old.json").history == []


def test_toml_config_and_paths_relative_to_the_config_folder(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    write_task_file(folder / "here.jsonl")
    write_task_file(tmp_path / "cwd.jsonl")
    monkeypatch.chdir(tmp_path)
    (folder / "grid.toml").write_text(
        'tasks = ["here.jsonl", "cwd.jsonl", "antonyms"]\nbudget = 100\nseeds = [3]\n'
        'searchers = ["none", {name = "given", label = "mine", options = {instructions = ["x"]}}]\n'
    )
    config = bench.load_config(folder / "grid.toml")
    assert config.tasks == [str((folder / "here.jsonl").resolve()), "cwd.jsonl", "antonyms"]
    assert config.out == folder / "grid-results" and config.seeds == [3]
    assert config.storage == f"sqlite:///{folder / 'grid-results' / 'studies.db'}"
    assert [(s.label, s.name) for s in config.searchers] == [("none", "none"), ("mine", "given")]
    assert config.searchers[1].options == {"instructions": ("x",)}
    assert [r.name for r in bench.plan(config)] == ["here-none-seed3", "here-mine-seed3"] + [
        f"{t}-{s}-seed3" for t in ("cwd", "antonyms") for s in ("none", "mine")
    ]


GOOD = {"tasks": ["antonyms"], "searchers": ["none"], "budget": 100}


def test_test_examples_default_to_the_sample_and_all_means_every_row(tmp_path):
    assert bench.load_config(_write_config(tmp_path / "a.json", **GOOD)).test_examples == 1000
    every = _write_config(tmp_path / "b.json", **GOOD, test_examples="all")
    assert bench.load_config(every).test_examples is None


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({**GOOD, "budjet": 5}, "unknown key 'budjet'"),
        ({**GOOD, "budget": 0}, "'budget' must be a positive integer, got 0"),
        ({**GOOD, "budget": "100"}, "'budget' must be a positive integer"),
        ({**GOOD, "budget": True}, "'budget' must be a positive integer"),
        ({**GOOD, "test_examples": "x"}, "'test_examples' must be a positive integer or \"all\""),
        ({"searchers": ["none"], "budget": 100}, "missing key 'tasks'"),
        ({**GOOD, "tasks": []}, "'tasks' must be a non-empty list"),
        ({**GOOD, "seeds": [0, 0]}, "'seeds' lists a seed twice"),
        ({**GOOD, "searchers": ["none", "bogus"]}, "'searchers[1]' (bogus): unknown searcher"),
        (
            {**GOOD, "searchers": [{"name": "ape", "options": {"roundz": 1}}]},
            "'searchers[0]' (ape): searcher 'ape' has no option roundz",
        ),
        (
            {**GOOD, "searchers": [{"name": "ape", "options": {"rounds": "2"}}]},
            "'searchers[0]' (ape): option 'rounds' has the wrong type: '2' (expected an integer)",
        ),
        (
            {**GOOD, "searchers": [{"name": "ape", "options": {"proposal_model": 3}}]},
            "option 'proposal_model' has the wrong type: 3 (expected a string or null)",
        ),
        (
            {**GOOD, "searchers": [{"name": "given", "options": {"instructions": "one"}}]},
            "option 'instructions' has the wrong type: 'one' (expected a list of strings)",
        ),
        ({**GOOD, "searchers": ["none", "none"]}, "'searchers[1]' repeats label 'none'"),
        ({**GOOD, "tasks": ["no/such/task"]}, "'tasks[0]': no/such/task: no such file"),
        ({**GOOD, "evaluator": "bogus"}, "'evaluator': unknown evaluator 'bogus'"),
    ],
)
def test_config_errors_exit_2_naming_the_file_and_key(settings, expected, tmp_path, capsys):
    config = _write_config(tmp_path / "bad.json", **settings)
    assert main(["bench", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"ape: error: {config}: ") and expected in err


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        (
            "bad.json",
            '{\n  "tasks": ["antonyms"],\n  "budget": 100\n  "searchers": []\n}\n',
            ":4: ",
        ),
        ("bad.toml", 'tasks = ["antonyms"]\nbudget = \n', "not valid TOML"),
        ("list.json", '["antonyms"]', "expected an object"),
    ],
)
def test_malformed_config_files_exit_2(name, text, expected, tmp_path, capsys):
    (tmp_path / name).write_text(text)
    assert main(["bench", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and name in err and expected in err


def test_help_describes_the_config_keys(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in ("CONFIG", "--quiet", *bench.KEYS, "summary.md", "plots"):
        assert word in text
