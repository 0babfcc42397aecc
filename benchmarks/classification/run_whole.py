"""The default searcher (`whole`, `choice` evaluator) on the 16-shot classification sets, against
the manual prompt and random demos.

Usage:
    python benchmarks/classification/run_whole.py [--datasets sst-2,mr] [--seeds 13,21]
        [--test-rows 300] [--out benchmarks/results/classification/whole]

Per dataset and seed: train and dev from seeds/SEED, the same fixed test subsample as run.py.
The manual prompt (run.py's MANUAL, one instruction naming the label words) is passed as the
run's human instruction, so it is a baseline in the pool, beside no instruction and the
same-seed random demos; the result's evidence gives best − each of them on test with a paired
bootstrap 95% interval. Per-run JSONs are skipped when present, so a cut-off run continues.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import DATASETS, MANUAL, REPO, load  # noqa: E402  (the soft-prompt benchmark's data)

import ape  # noqa: E402
from ape.device import describe_machine, machine_line  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "classification" / "whole"
SEEDS = (13, 21, 42, 87, 100)


def run_one(dataset: str, seed: int, lm, test_rows: int, out: Path) -> dict[str, Any]:
    task = load(dataset, seed, test_rows)
    started = time.perf_counter()
    result = ape.optimize(
        task,
        model=lm,
        evaluator="choice",
        seed=seed,
        storage=f"sqlite:///{out / 'studies.db'}",
        progress=False,
        instructions=(MANUAL[dataset],),
    )
    seconds = time.perf_counter() - started
    result.save(out / "runs" / f"{dataset}-whole-seed{seed}.json")
    tested = {e.origin: e.test_score for e in result.leaderboard if e.test_score is not None}
    return {
        "dataset": dataset,
        "seed": seed,
        "best": {
            "instruction": result.best.instruction,
            "demos": len(result.best.demos),
            "origin": result.best.origin,
            "test_accuracy": result.best.test_score,
        },
        "manual": tested.get("baseline: human"),
        "random_demos": tested.get("baseline: 5 random demos"),
        "evidence": result.evidence,
        "seconds": round(seconds, 1),
    }


def table(rows: list[dict[str, Any]], machine: str, test_rows: int) -> str:
    lines = [
        f"Measured on {machine}. Test accuracy on a fixed {test_rows}-row test sample; "
        "mean ± std over seeds.",
        "",
        "| dataset | seeds | whole | manual | 5 random demos | beats manual | beats random demos "
        "| s / run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    wins = 0
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r for r in rows if r["dataset"] == dataset]
        best = [r["best"]["test_accuracy"] for r in mine]
        manual = [
            r["manual"] if r["manual"] is not None else r["best"]["test_accuracy"] for r in mine
        ]
        demos = [
            r["random_demos"] if r["random_demos"] is not None else r["best"]["test_accuracy"]
            for r in mine
        ]
        over_manual = statistics.mean(best) > statistics.mean(manual)
        over_demos = statistics.mean(best) > statistics.mean(demos)
        wins += over_manual and over_demos
        lines.append(
            f"| {dataset} | {len(mine)} | {fmt(best)} | {fmt(manual)} | {fmt(demos)} | "
            f"{'yes' if over_manual else 'no'} | {'yes' if over_demos else 'no'} | "
            f"{statistics.median(r['seconds'] for r in mine):.0f} |"
        )
    count = len({r["dataset"] for r in rows})
    lines += ["", f"Beats both the manual prompt and random demos on **{wins} of {count}** sets."]
    return "\n".join(lines)


def fmt(values: list[float]) -> str:
    spread = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--test-rows", type=int, default=300)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    lm = ape.load_model()
    for seed in map(int, args.seeds.split(",")):
        for dataset in args.datasets.split(","):
            path = args.out / "runs" / f"{dataset}-seed{seed}.summary.json"
            if not path.is_file():
                print(f"== {dataset} seed {seed}", file=sys.stderr, flush=True)
                row = run_one(dataset, seed, lm, args.test_rows, args.out)
                path.write_text(json.dumps(row, indent=2) + "\n")
    # The table covers every run in the folder, not only this invocation's.
    rows = [json.loads(p.read_text()) for p in (args.out / "runs").glob("*.summary.json")]
    rows.sort(key=lambda r: (list(DATASETS).index(r["dataset"]), r["seed"]))
    text = table(rows, machine_line(describe_machine(lm.device)), args.test_rows)
    (args.out / "summary.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
