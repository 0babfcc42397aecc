"""RL prompts vs baselines on 16-shot classification (see README.md beside this file).

For each task: the test accuracy of no prompt, a manual one-line instruction with the label words,
random 5-token prompts (tokens drawn uniformly from the policy's vocabulary), the `rl` searcher
with its defaults (one run per seed) and, where asked, the `soft` searcher with its defaults and
APE at a modest budget. All are scored with the `choice` evaluator on the same fixed, seeded test
subsample.

    python benchmarks/rl/run.py          # sst-2 agnews mr subj, seeds 0 1 2, 200 test rows
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from ape.search.rl.policy import _banned_tokens

import ape
from ape.device import cpu_name
from ape.evaluation import make_evaluator
from ape.prompt import Prompt

DATA = Path("/work/shared/data/classification")
MANUAL = {
    "sst-2": "Is the sentiment of this movie review great or terrible?",
    "mr": "Is the sentiment of this movie review great or terrible?",
    "subj": "Is this sentence subjective or objective?",
    "agnews": "Is this news article about World, Sports, Business or Tech?",
}


def random_prompt(lm, length: int, seed: int) -> str:
    """`length` tokens drawn uniformly from the tokens the RL policy may write."""
    banned = _banned_tokens(lm.tokenizer, lm.model.get_output_embeddings().weight.shape[0])
    allowed = torch.nonzero(~banned).flatten().tolist()
    ids = random.Random(seed).sample(allowed, length)
    return lm.tokenizer.decode(ids).strip()


def run_task(name: str, args, lm, out: Path) -> dict:
    task = ape.load_task(DATA / name).sample_test(args.test_rows, seed=0)
    scorer = make_evaluator("choice", task)
    report: dict = {
        "task": name,
        "train": len(task.train),
        "val": len(task.val),
        "test": len(task.test),
        "methods": {},
    }

    fixed = {"none": "", "manual": MANUAL[name]}
    randoms = {seed: random_prompt(lm, 5, 1000 + seed) for seed in range(args.random_prompts)}
    prompts = list(fixed.values()) + list(randoms.values())
    began = time.perf_counter()
    test = scorer.score(lm, [Prompt(p) for p in prompts], task.test).mean(-1)
    val = scorer.score(lm, [Prompt(p) for p in prompts], task.val).mean(-1)
    seconds = time.perf_counter() - began
    print(f"[{name}] baselines scored in {seconds:.0f} s", flush=True)
    for i, (method, text) in enumerate(fixed.items()):
        report["methods"][method] = {
            "runs": [{"prompt": text, "val": float(val[i]), "test": float(test[i])}]
        }
    report["methods"]["random"] = {
        "runs": [
            {"seed": s, "prompt": randoms[s], "val": float(val[2 + k]), "test": float(test[2 + k])}
            for k, s in enumerate(randoms)
        ]
    }

    # (label, searcher, options), each run on every seed
    searchers = [("rl", "rl", {})]
    if name in args.ablation_tasks:  # learning vs selection: the same run without training
        searchers.append(("rl-untrained", "rl", {"learning_rate": 0.0}))
    if name in args.soft_tasks:
        searchers.append(("soft", "soft", {}))
    if name in args.ape_tasks:
        searchers.append(("ape", "ape", {"budget": args.ape_budget, **APE_OPTIONS}))
    for label, searcher, options in searchers:
        runs = []
        for seed in args.seeds:
            saved = out / "runs" / f"{name}-{label}-seed{seed}.json"
            if saved.exists() and not args.rerun:  # a finished run of an interrupted benchmark
                result = ape.Result.load(saved)
                wall = result.timings["total_s"]
            else:
                began = time.perf_counter()
                result = ape.optimize(
                    task, model=lm, searcher=searcher, evaluator="choice", seed=seed,
                    progress=False, test_top=1, **options,
                )  # fmt: skip
                wall = time.perf_counter() - began
                result.artifacts = {}  # policy weights (~9 MB a run) are not kept in the repo
                result.save(saved)
            runs.append(
                {
                    "seed": seed,
                    "prompt": result.best.instruction,
                    "val": result.best.val_score,
                    "test": result.best.test_score,
                    "budget_used": result.budget_used,
                    "wall_s": round(wall, 1),
                    "search_s": result.timings.get("search_s"),
                    "evidence_s": result.timings.get("evidence_s"),
                    "curve": [
                        [p["step"], p["reward"], p["accuracy"]]
                        for p in result.extras.get("training_curve", [])
                    ],
                }
            )
            print(
                f"[{name}] {label} seed {seed}: test {result.best.test_score:.3f} "
                f"val {result.best.val_score:.3f} in {wall:.0f} s, "
                f"{result.budget_used} units: {result.best.instruction!r}",
                flush=True,
            )
        report["methods"][label] = {"runs": runs, "searcher": searcher, "options": options}
    for method in report["methods"].values():
        tests = [r["test"] for r in method["runs"]]
        method["test_mean"] = float(np.mean(tests))
        method["test_std"] = float(np.std(tests))
    return report


APE_OPTIONS = {"num_subsamples": 2, "num_proposals": 4, "resample_rounds": 0}


def write_markdown(reports: list[dict], meta: dict, path: Path) -> None:
    lines = [
        "# RL prompts vs baselines (16-shot classification, `choice` evaluator)",
        "",
        f"{meta['model']} on {meta['device']} ({meta['threads']} torch threads; 1-min load "
        f"average {meta['load_before']:.1f} before, {meta['load_after']:.1f} after); "
        f"torch {meta['torch']}; {meta['date']}.",
        f"Test accuracy on a fixed seeded subsample of {meta['test_rows']} test rows; mean ± std "
        f"(population) over the runs listed per row: one per seed, and "
        f"{meta['random_prompts']} independent draws for random. Times are medians over "
        "the runs: search (training and selection), evidence (scoring the finalist and the "
        "no-prompt reference on validation and test), total.",
        "",
        "| task | method | test acc | val acc | budget (units) | search s | evidence s | total s "
        "| prompt (first run) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]

    def median(runs: list[dict], key: str) -> str:
        values = [r[key] for r in runs if r.get(key) is not None]
        return f"{np.median(values):.0f}" if values else ""

    for report in reports:
        for name, method in report["methods"].items():
            runs = method["runs"]
            n = len(runs)
            test = f"{method['test_mean']:.3f}" + (f" ± {method['test_std']:.3f}" if n > 1 else "")
            val = np.mean([r["val"] for r in runs])
            prompt = runs[0]["prompt"].replace("|", "\\|") or "(none)"
            seeds = [str(r["seed"]) for r in runs if "seed" in r]
            if name == "random":
                label = f"random ({n} draws)"
            elif seeds:
                label = f"{name} (seed{'s' if n > 1 else ''} {', '.join(seeds)})"
            else:
                label = name
            lines.append(
                f"| {report['task']} ({report['test']}) | {label} | {test} | {val:.3f} | "
                f"{median(runs, 'budget_used')} | {median(runs, 'search_s')} | "
                f"{median(runs, 'evidence_s')} | {median(runs, 'wall_s')} | `{prompt}` |"
            )
    lines += ["", "Budget: scored (prompt, example) pairs plus generated tokens.", ""]
    path.write_text("\n".join(lines))


def plot_curves(reports: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, len(reports), figsize=(4.5 * len(reports), 3.4), squeeze=False)
    for ax, report in zip(axes[0], reports, strict=True):
        for label, style in (("rl", "-"), ("rl-untrained", ":")):
            for run in report["methods"].get(label, {}).get("runs", []):
                curve = np.array(run["curve"], dtype=float)
                if not len(curve):
                    continue
                window = min(5, len(curve))
                smooth = np.convolve(curve[:, 1], np.ones(window) / window, mode="valid")
                ax.plot(curve[window - 1 :, 0], smooth, style, lw=1.5,
                        label=f"{label} seed {run['seed']}")  # fmt: skip
        ax.set_title(f"{report['task']}: reward per step (5-step mean)")
        ax.set_xlabel("step")
        ax.set_ylabel("mean reward of the step's prompts")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["sst-2", "agnews", "mr", "subj"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--test-rows", type=int, default=200)
    parser.add_argument("--ape-tasks", nargs="*", default=["sst-2", "agnews"])
    parser.add_argument("--ape-budget", type=int, default=1000)
    parser.add_argument("--soft-tasks", nargs="*", default=["sst-2", "agnews"])
    parser.add_argument(
        "--ablation-tasks",
        nargs="*",
        default=["sst-2", "agnews"],
        help="tasks that also run rl with --learning-rate 0 (selection without training)",
    )
    parser.add_argument("--random-prompts", type=int, default=5, help="random 5-token prompts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rerun", action="store_true", help="ignore finished runs in OUT/runs")
    parser.add_argument("--out", default="benchmarks/results/rl")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite summary.md and the plot from OUT"
    )
    args = parser.parse_args()
    out = Path(args.out)
    if args.report_only:
        saved = json.loads((out / "summary.json").read_text())
        write_markdown(saved["tasks"], saved["meta"], out / "summary.md")
        plot_curves(saved["tasks"], out / "training_curves.png")
        return
    torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    lm = ape.load_model()
    meta = {
        "model": lm.name,
        "device": f"{lm.device} ({cpu_name()})",
        "threads": args.threads,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "test_rows": args.test_rows,
        "seeds": args.seeds,
        "soft_tasks": args.soft_tasks,
        "random_prompts": args.random_prompts,
        "load_before": os.getloadavg()[0],
    }
    # Tasks from an earlier invocation into the same folder are kept (and listed first).
    summary = out / "summary.json"
    earlier = json.loads(summary.read_text())["tasks"] if summary.exists() else []
    reports = [r for r in earlier if r["task"] not in args.tasks]
    meta["earlier_runs"] = sorted({r["task"] for r in reports})
    for name in args.tasks:
        reports.append(run_task(name, args, lm, out))
        meta["load_after"] = os.getloadavg()[0]
        (out / "summary.json").write_text(json.dumps({"meta": meta, "tasks": reports}, indent=1))
        write_markdown(reports, meta, out / "summary.md")
        plot_curves(reports, out / "training_curves.png")
    print((out / "summary.md").read_text())


if __name__ == "__main__":
    main()
