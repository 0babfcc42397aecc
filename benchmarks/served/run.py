"""Served scoring throughput: a model behind an OpenAI-compatible server vs the in-process scorer.

Usage:
    python benchmarks/served/run.py --served openai:smollm2@http://127.0.0.1:8000/v1 \
        [--local smollm2-135m] [--instructions 4] [--examples 25] [--concurrency 1,8] \
        [--label "vLLM 0.32 CPU"] [--out benchmarks/results/served/NAME.json]

The workload is the scoring benchmark's (benchmarks/scoring/run.py: human instructions of the
Instruction Induction tasks on their first train rows), smaller by default. The server must
already be running; it serves the same model as `--local`. Each method scores every request once
after a short warm-up; the served model is timed at each concurrency (requests in flight). The
report gives requests per second, the agreement with the in-process scores (Spearman rho, max
absolute difference) and the tokens the server counted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from ape.models import load_model
from ape.served import OpenAICompatibleModel

REPO = Path(__file__).resolve().parents[2]
WARMUP = 4


def scoring_benchmark():
    """benchmarks/scoring/run.py as a module: its workload is this benchmark's."""
    path = REPO / "benchmarks" / "scoring" / "run.py"
    spec = importlib.util.spec_from_file_location("scoring_run", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def timed(score, requests) -> tuple[np.ndarray, float]:
    score(requests[:WARMUP])
    start = time.perf_counter()
    values = np.asarray(score(requests), dtype=np.float64)
    return values, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--served", required=True, help="openai:MODEL@BASE_URL of a running server")
    parser.add_argument("--local", default="smollm2-135m", help="the same model, in-process")
    parser.add_argument("--label", default="", help="what the server is, for the report")
    parser.add_argument("--instructions", type=int, default=4)
    parser.add_argument("--examples", type=int, default=25)
    parser.add_argument("--concurrency", default="1,8", help="requests in flight, comma-separated")
    parser.add_argument("--data", type=Path, default=None, help="Instruction Induction tasks")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/served/served.json")
    args = parser.parse_args()

    bench = scoring_benchmark()
    data = args.data or bench.DEFAULT_DATA
    work = bench.build_workload(data, args.instructions, args.examples)
    requests = work.requests
    load_before = os.getloadavg()[0]
    local = load_model(args.local)
    local_scores, local_s = timed(local.loglikelihood, requests)
    rows = [{"method": f"in-process ({args.local})", "concurrency": None, "seconds": local_s}]
    served_scores = None
    for concurrency in [int(c) for c in args.concurrency.split(",")]:
        served = OpenAICompatibleModel.from_spec(args.served, concurrency=concurrency)
        served_scores, seconds = timed(served.loglikelihood, requests)
        method = served.scoring().name
        rows.append(
            {
                "method": f"served ({method})",
                "concurrency": concurrency,
                "seconds": seconds,
                "usage": served.usage.to_json(),
            }
        )
    for row in rows:
        row["requests_per_s"] = round(len(requests) / row["seconds"], 2)
        row["seconds"] = round(row["seconds"], 3)
    rho = float(spearmanr(local_scores, served_scores).statistic)
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "served": args.served.split("@")[0],
        "label": args.label,
        "local": args.local,
        "requests": len(requests),
        "instructions": args.instructions,
        "examples": args.examples,
        "cpu_count": os.cpu_count(),
        "load_average_1m_before": round(load_before, 2),
        "load_average_1m_after": round(os.getloadavg()[0], 2),
        "spearman_rho": round(rho, 4),
        "max_abs_diff": float(np.max(np.abs(local_scores - served_scores))),
        "mean_abs_diff": float(np.mean(np.abs(local_scores - served_scores))),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    lines = [
        f"Scoring {report['requests']} requests ({report['instructions']} instructions x "
        f"{report['examples']} examples of the scoring benchmark's workload) with "
        f"{report['served']} ({report['label']}) and in-process {report['local']}; "
        f"{report['date']}, {report['cpu_count']} cores, 1-min load average "
        f"{report['load_average_1m_before']} before, {report['load_average_1m_after']} after.",
        f"Agreement with the in-process scores: Spearman rho {report['spearman_rho']}, "
        f"max abs difference {report['max_abs_diff']:.2e}, mean {report['mean_abs_diff']:.2e}.",
        "",
        "| Method | Requests in flight | Seconds | Requests/s | Server tokens (sent/received) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        usage = row.get("usage")
        tokens = f"{usage['sent']}/{usage['received']}" if usage else "–"
        lines.append(
            f"| {row['method']} | {row['concurrency'] or '–'} | {row['seconds']:.2f} "
            f"| {row['requests_per_s']:.1f} | {tokens} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
