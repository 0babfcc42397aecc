"""The default searcher (`whole`) on the 14 Instruction Induction tasks, against the baselines.

Usage:
    python benchmarks/instruction_induction/run_whole.py [--tasks antonyms,sum] [--seed 0]
        [--out benchmarks/results/instruction_induction/whole]

Per task (train.jsonl split into train/val by seed, test.jsonl the test set), `ape.optimize` runs
the default searcher with its defaults and the default evidence: the best prompt against no
instruction, the best human instruction on validation and the same-seed random demos, on test,
under log-likelihood and under the task's metric (greedy generation), each with a paired
bootstrap 95% interval. The instruction-only APE column and the best-on-test human instruction
are read from the earlier per-task results of `run.py` (the same splits and the same scoring
code). Per-task JSONs are written as tasks finish and skipped when present, so an interrupted run
continues; the study database resumes a task cut off mid-run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import ape
from ape.device import describe_machine, machine_line

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / ".." / "shared" / "data" / "instruction_induction"
EARLIER = REPO / "benchmarks" / "results" / "instruction_induction"
OUT = EARLIER / "whole"
DEVELOPMENT_TASKS = ("antonyms",)  # looked at while the defaults were chosen
BASELINES = ("no instruction", "best human instruction", "5 random demos")


def run_task(name: str, lm, seed: int, out: Path) -> dict[str, Any]:
    task = ape.load_task(DATA / name, seed=seed)
    started = time.perf_counter()
    result = ape.optimize(
        task, model=lm, seed=seed, storage=f"sqlite:///{out / 'studies.db'}", progress=False
    )
    seconds = time.perf_counter() - started
    result.save(out / "runs" / f"{name}-whole-seed{seed}.json")
    earlier = json.loads((EARLIER / f"{name}-seed{seed}.json").read_text())
    evidence = {(e["baseline"], e["score"]): e for e in result.evidence}
    return {
        "task": name,
        "metric": task.metric,
        "tuned_on": name in DEVELOPMENT_TASKS,
        "best": {
            "instruction": result.best.instruction,
            "demos": len(result.best.demos),
            "origin": result.best.origin,
            "tokens": result.best.tokens,
            "test_loglik": result.best.test_score,
            "test_metric": result.best.test_metric,
        },
        "vs": {
            f"{b} ({s})": evidence.get((b, s)) for b in BASELINES for s in ("loglik", task.metric)
        },
        "ape_instruction_only": {
            "test_loglik": earlier["ape"]["test_loglik"],
            "test_metric": earlier["ape"]["test_metric"],
        },
        "human_best_on_test": {
            "test_loglik": earlier["human"]["best_test_loglik"],
            "test_metric": earlier["human"]["best_test_metric"],
        },
        "seconds": round(seconds, 1),
        "timings": result.timings,
    }


def cell(item: dict[str, Any] | None) -> str:
    if item is None:
        return "(is best)"
    return f"{item['diff']:+.3f} [{item['low']:+.3f}, {item['high']:+.3f}]"


def table(rows: list[dict[str, Any]], machine: str) -> str:
    lines = [
        f"Measured on {machine}. Test split: 100 rows per task (common_concept: 16).",
        "",
        "| task | best prompt | test loglik | vs random demos | vs best human (val) "
        "| vs none | APE (instr. only) | metric | vs random demos | vs best human (val) "
        "| human best on test | s |",
        "|---|---|---:|---|---|---|---:|---:|---|---|---:|---:|",
    ]
    for r in rows:
        b, m = r["best"], r["metric"]
        name = r["task"] + (" (dev)" if r["tuned_on"] else "")
        prompt = (b["instruction"] or "(none)")[:40] + (
            f" + {b['demos']} demos" if b["demos"] else ""
        )
        lines.append(
            f"| {name} | {prompt} | {b['test_loglik']:.3f} | "
            f"{cell(r['vs']['5 random demos (loglik)'])} | "
            f"{cell(r['vs']['best human instruction (loglik)'])} | "
            f"{cell(r['vs']['no instruction (loglik)'])} | "
            f"{r['ape_instruction_only']['test_loglik']:.3f} | "
            f"{b['test_metric']:.2f} ({m}) | {cell(r['vs'][f'5 random demos ({m})'])} | "
            f"{cell(r['vs'][f'best human instruction ({m})'])} | "
            f"{r['human_best_on_test']['test_metric']:.2f} | {r['seconds']:.0f} |"
        )
    lines += ["", summary(rows)]
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]]) -> str:
    def at_least(r: dict[str, Any], key: str) -> bool:
        item = r["vs"].get(key)
        return item is None or item["diff"] >= 0

    loglik_all = [r for r in rows if all(at_least(r, f"{b} (loglik)") for b in BASELINES)]
    above = [
        r
        for r in rows
        if r["vs"]["5 random demos (loglik)"] is None
        or r["vs"]["5 random demos (loglik)"]["low"] > 0
    ]
    metric_vs_human = [
        r for r in rows if r["best"]["test_metric"] >= r["human_best_on_test"]["test_metric"]
    ]
    return (
        f"Test log-likelihood at least that of random demos, the best human instruction on "
        f"validation and no instruction: **{len(loglik_all)} of {len(rows)}** tasks; interval "
        f"against random demos above 0: **{len(above)} of {len(rows)}**. Under each task's "
        f"metric, matches or beats the best human instruction *on test* (an oracle pick): "
        f"**{len(metric_vs_human)} of {len(rows)}**."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", help="comma-separated task names (default: all 14)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    names = (
        args.tasks.split(",")
        if args.tasks
        else sorted(p.name for p in DATA.iterdir() if (p / "meta.json").is_file())
    )
    args.out.mkdir(parents=True, exist_ok=True)
    lm = ape.load_model()
    rows = []
    for name in names:
        path = args.out / f"{name}-seed{args.seed}.json"
        if not path.is_file():
            print(f"== {name}", file=sys.stderr, flush=True)
            path.write_text(json.dumps(run_task(name, lm, args.seed, args.out), indent=2) + "\n")
        rows.append(json.loads(path.read_text()))
    text = table(rows, machine_line(describe_machine(lm.device)))
    (args.out / f"summary-seed{args.seed}.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
