"""Does a run choose the same prompt in bfloat16 as in float32? Agreement on the 14 Instruction
Induction tasks.

Usage:
    python benchmarks/scoring/dtype_agreement.py [--dtype bfloat16] [--prompts 10] [--rows 20]
        [--test-rows 50] [--tasks antonyms,...] [--out benchmarks/results/dtype_agreement.json]

Per task, the candidates are the first `--prompts` distinct instructions of the committed `ape`
run's leaderboard (benchmarks/results/instruction_induction/runs/TASK-ape-seed0.json), the
prompts a default search actually compares. Each is scored (`loglik`, mean over examples) on the
first `--rows` validation rows of the task (seed 0 split) once in float32 and once in `--dtype`.
Reported per task: Spearman's rho between the two score vectors, whether the top-1 is the same
prompt, the largest score difference, and the float32 test score (first `--test-rows` test rows)
of the prompt each dtype picks: what a user would lose by selecting in the faster dtype.

The agreement is a property of the arithmetic, not of speed: on a CPU without bf16 units
(avx512_bf16 / AMX) torch still computes bf16 products with fp32 accumulation, only slower, so
the scores measured here are the ones a bf16-capable CPU gives (up to summation order).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

import ape
from ape.device import describe_machine, machine_line
from ape.evaluation import make_evaluator
from ape.prompt import Prompt

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "instruction_induction"
RUNS = REPO / "benchmarks" / "results" / "instruction_induction" / "runs"
OUT = REPO / "benchmarks" / "results" / "dtype_agreement.json"


def candidates(task: str, n: int) -> list[str]:
    board = json.loads((RUNS / f"{task}-ape-seed0.json").read_text(encoding="utf-8"))["leaderboard"]
    seen: dict[str, None] = {}
    for entry in board:
        if entry["instruction"].strip():
            seen.setdefault(entry["instruction"], None)
    return list(seen)[:n]


def mean_scores(lm, task: ape.Task, prompts: list[Prompt], rows) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    scores = make_evaluator("loglik", task).score(lm, prompts, rows).mean(axis=1)
    return scores, time.perf_counter() - started


def compare_task(name: str, models: dict[str, Any], args) -> dict[str, Any]:
    task = ape.load_task(DATA / name, seed=0)
    texts = candidates(name, args.prompts)
    prompts = [Prompt(t) for t in texts]
    rows = task.val[: args.rows]
    (ref, ref_s), (fast, fast_s) = (mean_scores(lm, task, prompts, rows) for lm in models.values())
    picks = {"float32": int(np.argmax(ref)), args.dtype: int(np.argmax(fast))}
    chosen = sorted(set(picks.values()))
    test = mean_scores(
        models["float32"], task, [prompts[i] for i in chosen], task.test[: args.test_rows]
    )[0]
    test_of = dict(zip(chosen, test.tolist(), strict=True))
    return {
        "task": name,
        "prompts": len(prompts),
        "rows": len(rows),
        "spearman_rho": float(stats.spearmanr(ref, fast).statistic),
        "top1_same": picks["float32"] == picks[args.dtype],
        "max_abs_diff": float(np.max(np.abs(ref - fast))),
        "test_float32_pick": test_of[picks["float32"]],
        f"test_{args.dtype}_pick": test_of[picks[args.dtype]],
        "seconds": {"float32": round(ref_s, 1), args.dtype: round(fast_s, 1)},
        "picks": {k: texts[v] for k, v in picks.items()},
    }


def markdown(report: dict[str, Any]) -> str:
    dtype, rows = report["dtype"], report["tasks"]
    lines = [
        f"# Prompt selection in {dtype} against float32 ({report['date']})",
        "",
        f"{report['machine']}. Per task: {report['settings']['prompts']} candidates (the `ape` "
        f"run's leaderboard), loglik on {report['settings']['rows']} validation rows; test: "
        f"float32 loglik of each dtype's pick on {report['settings']['test_rows']} test rows.",
        "",
        f"| task | Spearman ρ | same top-1 | max abs Δ | test, float32 pick | test, {dtype} pick |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['spearman_rho']:.3f} | {'yes' if r['top1_same'] else 'no'} | "
            f"{r['max_abs_diff']:.2e} | {r['test_float32_pick']:.4f} | "
            f"{r[f'test_{dtype}_pick']:.4f} |"
        )
    rhos = [r["spearman_rho"] for r in rows]
    same = sum(r["top1_same"] for r in rows)
    loss = [r["test_float32_pick"] - r[f"test_{dtype}_pick"] for r in rows]
    lines += [
        "",
        f"Median ρ {np.median(rhos):.3f} (min {min(rhos):.3f}); same top-1 on {same} of "
        f"{len(rows)} tasks; test loss from picking in {dtype}: mean {np.mean(loss):+.4f}, "
        f"largest {max(loss):+.4f} nats per example.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--test-rows", type=int, default=50)
    parser.add_argument("--tasks", help="comma-separated (default: every task with an ape run)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    names = (
        args.tasks.split(",")
        if args.tasks
        else sorted(p.name.removesuffix("-ape-seed0.json") for p in RUNS.glob("*-ape-seed0.json"))
    )
    models = {
        "float32": ape.load_model(dtype="float32"),
        args.dtype: ape.load_model(dtype=args.dtype),
    }
    rows = []
    for name in names:
        rows.append(compare_task(name, models, args))
        print(
            json.dumps({k: rows[-1][k] for k in ("task", "spearman_rho", "top1_same")}), flush=True
        )
    report = {
        "benchmark": "dtype_agreement",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "dtype": args.dtype,
        "machine": machine_line(describe_machine(models["float32"].device)),
        "settings": {"prompts": args.prompts, "rows": args.rows, "test_rows": args.test_rows},
        "tasks": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    text = markdown(report)
    args.out.with_suffix(".md").write_text(text, encoding="utf-8")
    print(text)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)


if __name__ == "__main__":
    main()
