"""Prompt tuning, prefix tuning and P-tuning against the manual prompt and no prompt, on the 16-shot
classification sets.

Usage:
    python benchmarks/classification/run_soft.py [--datasets sst-2,mr] [--seeds 13,21,42,87,100]
        [--modes continuous,prefix,ptuning] [--test-rows 300] [--option lr=0.05 ...]
        [--out benchmarks/results/classification/soft] [--summary-only]

Per dataset, seed and mode: one default `ape.optimize(searcher="soft", evaluator="choice",
mode=MODE)` on seeds/SEED/train.jsonl (training) and dev.jsonl (selection), with run.py's manual
instruction as the task's human instruction, so every run starts from the manual prompt (the
searcher's default init). Its test accuracy is the result's best entry (what the run ends at) on
run.py's fixed test subsample; the initial prompt's test accuracy is kept beside it. The manual
prompt and no prompt involve no training, so they have one number per dataset. Per-run JSONs are
written as runs finish and skipped when present: an interrupted benchmark continues.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import DATASETS, MANUAL, REPO, SEEDS, TUNED_ON, load, mean_std  # noqa: E402

import ape  # noqa: E402
from ape.device import describe_machine, machine_line  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "classification" / "soft"
MODES = {"continuous": "prompt tuning", "prefix": "prefix tuning", "ptuning": "P-tuning"}
START = "soft: initial prompt"


def run_one(dataset: str, seed: int, mode: str, lm, args, out: Path) -> dict[str, Any]:
    path = out / "runs" / f"{dataset}-{mode}-seed{seed}.summary.json"
    if path.exists():
        return json.loads(path.read_text())
    task = load(dataset, seed, args.test_rows)
    task = dataclasses.replace(task, human_instructions=[MANUAL[dataset]])
    started, cpu = time.perf_counter(), time.process_time()
    result = ape.optimize(
        task,
        model=lm,
        searcher="soft",
        evaluator="choice",
        seed=seed,
        storage=f"sqlite:///{out / 'studies.db'}",
        study=f"{dataset}-{mode}",
        progress=False,
        mode=mode,
        **args.options,
    )
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    result.save(out / "runs" / f"{dataset}-{mode}-seed{seed}.json")
    extras = result.extras["soft_prompt"]
    start = next(e for e in result.leaderboard if e.origin == START)
    summary = {
        "dataset": dataset,
        "seed": seed,
        "mode": mode,
        "test": result.best.test_score,
        "best_origin": result.best.origin,
        "dev": result.best.val_score,
        "start_test": start.test_score,
        "start_dev": start.val_score,
        "kept_start": extras.get("kept_start"),
        "picked_step": extras.get("picked_step"),
        "acceptance": extras.get("acceptance"),
        "checkpoints": extras["checkpoints"],
        "none_test": result.reference.test_score if result.reference else None,
        "seconds": round(seconds, 1),
        "train_seconds": round(
            result.timings.get("total_s", 0) - result.timings.get("evidence_s", 0), 1
        ),
        "cpu_seconds": round(cpu, 1),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "options": args.options,
    }
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def run_fixed(dataset: str, lm, args, out: Path) -> dict[str, Any]:
    """The manual prompt and no prompt on the test rows (no training: one number per set)."""
    path = out / "runs" / f"{dataset}-fixed.json"
    if path.exists():
        return json.loads(path.read_text())
    task = load(dataset, SEEDS[0], args.test_rows)
    manual, none = ape.evaluate(
        task, [MANUAL[dataset], ""], model=lm, evaluator="choice", split="test"
    )
    summary = {"dataset": dataset, "manual_test": manual, "none_test": none}
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def table(rows: list[dict], fixed: dict[str, dict], datasets: list[str], modes: list[str]) -> str:
    head = " | ".join(f"{MODES[m]} (mean ± std)" for m in modes)
    lines = [
        f"| dataset | tuned on? | seeds | {head} | manual prompt | no prompt | "
        "runs below their start | train wall s (median) |",
        "|---|---|---:|" + "---:|" * len(modes) + "---:|---:|---:|---|",
    ]
    means: dict[str, list[float]] = {m: [] for m in [*modes, "manual", "none"]}
    for dataset in datasets:
        runs = [r for r in rows if r["dataset"] == dataset]
        if dataset not in fixed or not runs:
            continue
        cells, seeds, walls = [], set(), []
        for mode in modes:
            mine = [r for r in runs if r["mode"] == mode]
            seeds |= {r["seed"] for r in mine}
            cells.append(mean_std([r["test"] for r in mine]))
            if mine:
                means[mode].append(float(np.mean([r["test"] for r in mine])))
                walls.append(f"{MODES[mode]} {np.median([r['train_seconds'] for r in mine]):.0f}")
        below = sum(r["test"] < r["start_test"] for r in runs)
        means["manual"].append(fixed[dataset]["manual_test"])
        means["none"].append(fixed[dataset]["none_test"])
        lines.append(
            f"| {dataset} | {'yes' if dataset in TUNED_ON else 'no'} | {len(seeds)} | "
            + " | ".join(cells)
            + f" | {fixed[dataset]['manual_test']:.3f} | {fixed[dataset]['none_test']:.3f} | "
            f"{below} of {len(runs)} | {', '.join(walls)} |"
        )
    if all(len(v) == len(means["manual"]) for v in means.values()) and means["manual"]:
        cells = " | ".join(f"{np.mean(means[m]):.3f}" for m in modes)
        lines.append(
            f"| mean of the sets | | | {cells} | {np.mean(means['manual']):.3f} | "
            f"{np.mean(means['none']):.3f} | | |"
        )
    return "\n".join(lines) + "\n"


def write(out: Path, rows: list[dict], fixed: dict, args) -> None:
    env = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": "smollm2-135m (SmolLM2-135M-Instruct, float32)",
        "device": machine_line(describe_machine("cpu")),
        "torch": torch.__version__,
    }
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    (out / "summary.json").write_text(
        json.dumps({"env": env, "settings": settings, "fixed": fixed, "runs": rows}, indent=2)
        + "\n"
    )
    per_run = "".join(
        f"| {r['dataset']} | {r['seed']} | {MODES[r['mode']]} | {r['test']:.3f} | "
        f"{r['start_test']:.3f} | {r['dev']:.3f} | {r['best_origin']} | {r['train_seconds']:.0f} | "
        f"{r['cpu_seconds']:.0f} | {r['load_average_1min']:.1f} |\n"
        for r in rows
    )
    (out / "summary.md").write_text(
        f"Test accuracy on a fixed {args.test_rows}-row subsample of each test set (the same rows "
        f"for every method and seed); trained methods: mean ± std over the seeds' train/dev "
        f"splits, each the best entry of a default `soft` run started from the manual prompt.\n"
        f"{env['model']} on {env['device']}; torch {env['torch']}; {env['date']}.\n"
        f"Options beyond the defaults: {args.options or 'none'}.\n\n"
        + table(rows, fixed, args.datasets, args.modes)
        + "\nPer run (start = the initial prompt, i.e. the manual prompt as vectors; train wall s"
        " = the run without its test scoring; cpu s = the process's CPU time for the whole run;"
        " load = 1-minute load average at its end):\n\n"
        "| dataset | seed | method | test | start test | dev | best entry | train wall s | "
        "cpu s | load |\n|---|---:|---|---:|---:|---:|---|---:|---:|---:|\n" + per_run
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--test-rows", type=int, default=300)
    parser.add_argument("--option", action="append", default=[], help="searcher option k=v")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--summary-only", action="store_true")
    args = parser.parse_args()
    args.datasets, args.modes = args.datasets.split(","), args.modes.split(",")
    args.options = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.option)}
    seeds = [int(s) for s in args.seeds.split(",")]
    out: Path = args.out
    (out / "runs").mkdir(parents=True, exist_ok=True)
    lm = None if args.summary_only else ape.load_model()
    rows, fixed = [], {}
    # Seeds outermost: cut off at any point, every dataset and mode has about as many seeds.
    for seed in seeds:
        for dataset in args.datasets:
            for mode in args.modes:
                done = out / "runs" / f"{dataset}-{mode}-seed{seed}.summary.json"
                if lm is None and not done.exists():
                    continue
                if dataset not in fixed and (
                    lm is not None or (out / "runs" / f"{dataset}-fixed.json").exists()
                ):
                    fixed[dataset] = run_fixed(dataset, lm, args, out)
                rows.append(run_one(dataset, seed, mode, lm, args, out))
                print(
                    json.dumps(
                        {
                            k: rows[-1][k]
                            for k in ("dataset", "seed", "mode", "test", "start_test", "seconds")
                        }
                    ),
                    flush=True,
                )
                write(out, rows, fixed, args)
    write(out, rows, fixed, args)


if __name__ == "__main__":
    main()
