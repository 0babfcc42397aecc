"""The summary: mean ± std across seeds, per-task wins and score-against-budget curves."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ape.bench.config import BenchConfig
from ape.bench.grid import Run, plan
from ape.bench.plots import plot
from ape.device import machine_line
from ape.result import Result, finite


@dataclass
class Summary:
    markdown: str
    data: dict[str, Any]
    files: list[Path]


def summarize(config: BenchConfig, runs: list[Run] | None = None) -> Summary:
    """Write OUT/summary.md, OUT/summary.json and OUT/plots/*.png from the saved results."""
    runs = plan(config) if runs is None else runs
    results = {run.name: Result.load(run.path) for run in runs if run.path.is_file()}
    tasks = list(dict.fromkeys(r.task for r in runs))
    labels = [s.label for s in config.searchers]

    rows = []
    for task in tasks:
        for label in labels:
            done = [
                (r, results[r.name])
                for r in runs
                if r.name in results and r.task == task and r.searcher.label == label
            ]
            if done:
                rows.append(_row(task, label, done))
    wins: dict[str, list[str]] = {}
    for task in tasks:
        scored = [r for r in rows if r["task"] == task and r["test_mean"] is not None]
        top = max((r["test_mean"] for r in scored), default=None)
        wins[task] = [r["searcher"] for r in scored if r["test_mean"] == top]
    win_counts = {label: sum(label in w for w in wins.values()) for label in labels}
    curves = {
        task: _curves([(r, results[r.name]) for r in runs if r.name in results and r.task == task])
        for task in tasks
    }

    files = []
    plots = plot(config, curves)
    files += plots
    data = {
        "config": str(config.path),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": config.model,
        "evaluator": config.evaluator,
        "budget": config.budget,
        "seeds": config.seeds,
        "searchers": [dataclasses.asdict(s) for s in config.searchers],
        "tasks": tasks,
        "rows": rows,
        "wins": wins,
        "win_counts": win_counts,
        "curves": curves,
        "missing": [r.name for r in runs if r.name not in results],
    }
    machines = []  # distinct, in run order
    for result in results.values():
        if result.machine and result.machine not in machines:
            machines.append(result.machine)
    data["machines"] = machines
    markdown = _markdown(config, rows, wins, win_counts, plots, data["missing"], machines)
    config.out.mkdir(parents=True, exist_ok=True)
    md, js = config.out / "summary.md", config.out / "summary.json"
    md.write_text(markdown, encoding="utf-8")
    js.write_text(json.dumps(finite(data), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return Summary(markdown, data, [md, js, *files])


def _row(task: str, label: str, done: list[tuple[Run, Result]]) -> dict[str, Any]:
    def stats(values: list[float | None]) -> tuple[float | None, float | None]:
        values = [v for v in values if v is not None and math.isfinite(v)]
        if not values:
            return None, None
        std = float(np.std(values, ddof=1)) if len(values) > 1 else None
        return float(np.mean(values)), std

    tests = [res.best.test_score if res.best else None for _, res in done]
    vals = [res.best.val_score if res.best else None for _, res in done]
    test_mean, test_std = stats(tests)
    val_mean, val_std = stats(vals)
    return {
        "task": task,
        "searcher": label,
        "test_mean": test_mean,
        "test_std": test_std,
        "val_mean": val_mean,
        "val_std": val_std,
        "budget_used_mean": float(np.mean([res.budget_used for _, res in done])),
        "wall_s_median": float(np.median([res.timings.get("total_s", 0.0) for _, res in done])),
        "runs": [
            {
                "seed": run.seed,
                "file": str(run.path),
                "test": test,
                "val": val,
                "budget_used": res.budget_used,
                "wall_s": res.timings.get("total_s"),
                "instruction": res.best.instruction if res.best else None,
                "demos": len(res.best.demos) if res.best else 0,
            }
            for (run, res), test, val in zip(done, tests, vals, strict=True)
        ],
    }


def _curves(done: list[tuple[Run, Result]]) -> dict[str, Any]:
    """Per searcher, best validation score so far on one budget grid: mean, min and max over seeds.

    The grid is every budget at which some run's best changed, plus where each run stopped; each
    run's curve is a step function (its value holds until the next point, and after the run
    stopped), undefined (NaN) before its first scored candidate. Mean, min and max are taken
    where every seed is defined.
    """
    done = [(run, res) for run, res in done if res.history]
    grid = sorted({b for _, res in done for b, _ in res.history} | {r.budget_used for _, r in done})
    xs = np.array(grid, dtype=float)
    curves: dict[str, Any] = {"budget": grid, "searchers": {}}
    by_label: dict[str, list[np.ndarray]] = {}
    for run, res in done:
        by_label.setdefault(run.searcher.label, []).append(step(res.history, xs))
    for label, ys in by_label.items():
        stack = np.stack(ys)
        curves["searchers"][label] = {
            "mean": stack.mean(axis=0).tolist(),
            "min": stack.min(axis=0).tolist(),
            "max": stack.max(axis=0).tolist(),
            "seeds": len(ys),
        }
    return curves


def step(history: list[list[float]], xs: np.ndarray) -> np.ndarray:
    """The step function through `history` ([budget, value] points) at budgets `xs`."""
    budgets = np.array([b for b, _ in history], dtype=float)
    values = np.array([v for _, v in history], dtype=float)
    index = np.searchsorted(budgets, xs, side="right") - 1
    return np.where(index >= 0, values[np.clip(index, 0, None)], np.nan)


def _markdown(config, rows, wins, win_counts, plots, missing, machines) -> str:
    def fmt(mean: float | None, std: float | None, digits: int = 4) -> str:
        if mean is None:
            return "-"
        return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")

    seeds = ", ".join(str(s) for s in config.seeds)
    lines = [
        f"# Benchmark: {config.path.name}",
        "",
        f"Model {config.model}, evaluator {config.evaluator}, budget {config.budget} units per "
        f"run (scored pairs + generated tokens), seeds {seeds}. Scores are means across seeds "
        "± sample standard deviation; *test* is each run's best prompt (chosen on validation) "
        "scored once on the test split. **Bold**: the best mean test score of the task.",
        "",
        *(f"Timed on: {machine_line(m)}." for m in machines),
        "",
        "| task | searcher | test | val | budget used | wall s (median) | runs |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        test = fmt(row["test_mean"], row["test_std"])
        if row["searcher"] in wins.get(row["task"], []):
            test = f"**{test}**"
        lines.append(
            f"| {row['task']} | {row['searcher']} | {test} | "
            f"{fmt(row['val_mean'], row['val_std'])} | {row['budget_used_mean']:.0f} | "
            f"{row['wall_s_median']:.1f} | {len(row['runs'])} |"
        )
    lines += ["", "## Wins per searcher", "", "| searcher | wins | tasks |", "|---|---:|---|"]
    for label, count in sorted(win_counts.items(), key=lambda kv: -kv[1]):
        won = ", ".join(t for t, w in wins.items() if label in w)
        lines.append(f"| {label} | {count} | {won} |")
    if missing:
        lines += ["", f"Missing runs ({len(missing)}): {', '.join(missing)}"]
    if plots:
        lines += ["", "## Best validation score against budget spent", ""]
        lines += [f"![{p.stem}](plots/{p.name})" for p in plots]
    return "\n".join(lines) + "\n"
