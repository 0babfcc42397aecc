"""Scoring throughput: ape's batched scorer vs a naive loop vs lm-evaluation-harness.

Usage:
    python benchmarks/scoring/run.py [--workload human|ape-length|few-shot] [--repeats 3]
        [--quick] [--methods ape,naive,lmeval] [--lmeval-batch-sizes 1,8,16,32,64] [--out PATH]
        [--dtype float32|bfloat16]

Every method scores the same requests (workloads.py) with the same model object (CPU, float32
unless --dtype says otherwise, a fixed number of torch threads), round-robin over the methods
one repeat at a time, so background load hits every method alike. The workload's GEMM floor
(floor.py) is measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import ape
from ape.device import cpu_name
from ape.lm import HFLanguageModel, Request
from ape.reference import reference_loglikelihood

sys.path.insert(0, str(Path(__file__).resolve().parent))
from floor import floor, gemm_rate  # noqa: E402
from workloads import PER_TASK, WORKLOADS, build_workload  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO / ".." / "shared" / "data" / "instruction_induction"
RESULTS_DIR = REPO / "benchmarks" / "results"
METHODS = ("ape", "naive", "lmeval")
# Untimed first call per method on a few requests: pays one-off costs (allocator, kernel choice).
WARMUP_REQUESTS = 4

Scorer = Callable[[Sequence[Request]], np.ndarray]


@dataclass(frozen=True)
class Config:
    """One benchmark configuration; `--quick` only changes the sizes."""

    instructions: int
    examples: int
    repeats: int
    lmeval_batch_sizes: tuple[int, ...]
    default_out: Path


FULL = Config(20, 50, 3, (1, 8, 16, 32, 64), RESULTS_DIR / "scoring.json")
QUICK = Config(2, 5, 1, (1, 8), RESULTS_DIR / "scoring-quick.json")


@dataclass
class Method:
    """A named scorer and what its timed runs produced."""

    name: str  # "ape", "naive" or "lmeval"
    batch_size: int | None  # lm-eval's batch size; None for the others
    score: Scorer
    times: list[float] = field(default_factory=list)  # wall-clock seconds
    cpu_times: list[float] = field(default_factory=list)  # process CPU seconds, all threads
    scores: np.ndarray | None = None

    @property
    def label(self) -> str:
        return f"lmeval-bs{self.batch_size}" if self.name == "lmeval" else self.name

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def token_stats(lm: HFLanguageModel, requests: Sequence[Request]) -> dict[str, float]:
    pairs = lm.encode_pairs(requests)
    context = [len(c) for c, _ in pairs]
    continuation = [len(k) for _, k in pairs]
    return {
        "mean_context_tokens": round(float(np.mean(context)), 2),
        "mean_continuation_tokens": round(float(np.mean(continuation)), 2),
        "max_sequence_tokens": max(c + k for c, k in zip(context, continuation, strict=True)),
        # Tokens a plain one-pass-per-request scorer feeds the model (last token is only a target).
        "total_input_tokens": sum(context) + sum(continuation) - len(pairs),
    }


# ---------------------------------------------------------------------------- scorers


def ape_scorer(lm: HFLanguageModel) -> Scorer:
    def score(requests: Sequence[Request]) -> np.ndarray:
        # Every repeat starts cold: prefixes kept from the previous repeat would be free here,
        # which one pass over a workload never gets.
        lm.clear_prefix_cache()
        return np.asarray(lm.loglikelihood(requests), dtype=np.float64)

    return score


def naive_scorer(lm: HFLanguageModel) -> Scorer:
    return lambda requests: reference_loglikelihood(lm, requests)


def lmeval_scorer(lm: HFLanguageModel, batch_size: int) -> Scorer:
    """lm-eval's HFLM wrapped around the very same model and tokenizer objects."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    # A non-str `pretrained` is used as is (no reload, no device move); see HFLM.__init__.
    hflm = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch_size)

    def score(requests: Sequence[Request]) -> np.ndarray:
        instances = [
            Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i)
            for i, r in enumerate(requests)
        ]
        results = hflm.loglikelihood(instances, disable_tqdm=True)  # (logprob, is_greedy)
        return np.array([logprob for logprob, _ in results], dtype=np.float64)

    return score


def make_methods(
    lm: HFLanguageModel, names: Sequence[str], batch_sizes: Sequence[int]
) -> list[Method]:
    methods: list[Method] = []
    for name in names:
        if name == "ape":
            methods.append(Method("ape", None, ape_scorer(lm)))
        elif name == "naive":
            methods.append(Method("naive", None, naive_scorer(lm)))
        else:
            methods += [Method("lmeval", b, lmeval_scorer(lm, b)) for b in batch_sizes]
    return methods


# ---------------------------------------------------------------------------- timing


def run_all(methods: list[Method], requests: list[Request], repeats: int, threads: int) -> None:
    for method in methods:
        method.score(requests[:WARMUP_REQUESTS])
    for repeat in range(repeats):
        for method in methods:
            torch.set_num_threads(threads)  # nothing may have changed it; be sure anyway
            gc.collect()  # keep one method's garbage out of the next one's timing
            start, cpu_start = time.perf_counter(), time.process_time()
            scores = method.score(requests)
            method.times.append(time.perf_counter() - start)
            method.cpu_times.append(time.process_time() - cpu_start)
            method.scores = scores
            print(
                f"[repeat {repeat + 1}/{repeats}] {method.label:>14}: "
                f"{method.times[-1]:8.2f} s wall, {method.cpu_times[-1]:8.2f} s CPU",
                file=sys.stderr,
                flush=True,
            )


def max_abs_diff(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    return None if a is None or b is None else float(np.max(np.abs(a - b)))


def method_row(
    m: Method, n_requests: int, ape_m: Method | None, naive_m: Method | None
) -> dict[str, Any]:
    return {
        "method": m.name,
        "label": m.label,
        "batch_size": m.batch_size,
        "times_s": [round(t, 4) for t in m.times],
        "median_s": round(m.median, 4),
        # CPU time moves much less than wall time when other processes compete for the cores.
        "cpu_times_s": [round(t, 4) for t in m.cpu_times],
        "median_cpu_s": round(statistics.median(m.cpu_times), 4),
        "requests_per_s": round(n_requests / m.median, 2),
        # How many times faster ape is than this method (>1: ape wins).
        "ape_speedup": round(m.median / ape_m.median, 3) if ape_m else None,
        "max_abs_diff_vs_ape": max_abs_diff(m.scores, ape_m.scores if ape_m else None),
        "max_abs_diff_vs_naive": max_abs_diff(m.scores, naive_m.scores if naive_m else None),
    }


def summarize(methods: list[Method], n_requests: int) -> dict[str, Any]:
    by_label = {m.label: m for m in methods}
    ape_m, naive_m = by_label.get("ape"), by_label.get("naive")
    rows = [method_row(m, n_requests, ape_m, naive_m) for m in methods]
    lmeval_rows = [r for r in rows if r["method"] == "lmeval"]
    best = min(lmeval_rows, key=lambda r: r["median_s"]) if lmeval_rows else None
    return {"methods": rows, "lmeval_best": best}


# ---------------------------------------------------------------------------- environment


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def environment(lm: HFLanguageModel, threads: int, load_before: float) -> dict[str, Any]:
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(lm.device),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": package_version("transformers"),
        "lm_eval": package_version("lm_eval"),
        "ape": package_version("ape-optimizer"),
        "torch_threads": threads,
        "torch_interop_threads": torch.get_num_interop_threads(),
        "model": lm.name,
        "model_class": type(lm.model).__name__,
        "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
        "ape_max_batch_tokens": lm.max_batch_tokens,
        # A load above the thread count means the timings shared the cores with other work.
        "load_average_1m_before": round(load_before, 2),
        "load_average_1m_after": round(os.getloadavg()[0], 2),
    }


# ---------------------------------------------------------------------------- report


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(report: dict[str, Any]) -> str:
    env, work, summary = report["environment"], report["workload"], report["summary"]
    lines = [
        f"Scoring {work['n_requests']} requests ({work.get('name', 'human')} workload: "
        f"{work['n_instructions']} prompts × "
        f"{work['n_examples']} examples; mean {work['mean_context_tokens']} context + "
        f"{work['mean_continuation_tokens']} continuation tokens), median of "
        f"{report['repeats']} run(s).",
        f"{env['model']} ({env['model_class']}, {env['dtype']}) on {env['device']}: "
        f"{env['cpu']}, {env['torch_threads']} torch threads; torch {env['torch']}, "
        f"transformers {env['transformers']}, lm-eval {env['lm_eval']}; {env['date']}; "
        f"1-min load average {env['load_average_1m_before']} before, "
        f"{env['load_average_1m_after']} after.",
        "",
        "| Method | Median s | CPU s | Requests/s | ape speed-up | max abs Δ vs ape "
        "| max abs Δ vs naive |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summary["methods"]:
        lines.append(
            f"| {_label(row, env)} | {row['median_s']:.2f} | {row['median_cpu_s']:.2f} "
            f"| {row['requests_per_s']:.1f} "
            f"| {_fmt(row['ape_speedup'], '.2f')} | {_fmt(row['max_abs_diff_vs_ape'], '.2e')} "
            f"| {_fmt(row['max_abs_diff_vs_naive'], '.2e')} |"
        )
    lines += _floor_lines(report)
    best = summary["lmeval_best"]
    if best is not None:
        lines += [
            "",
            f"lm-eval's fastest batch size: {best['batch_size']} ({best['median_s']:.2f} s)"
            + (
                f"; ape's speed-up over it: {best['ape_speedup']:.2f}×."
                if best["ape_speedup"]
                else "."
            ),
        ]
    return "\n".join(lines) + "\n"


def _floor_lines(report: dict[str, Any]) -> list[str]:
    f = report.get("floor")
    if not f:
        return []
    ape_row = next((r for r in report["summary"]["methods"] if r["method"] == "ape"), None)
    ratio = f"; ape takes {ape_row['median_s'] / f['floor_s']:.2f}x the floor" if ape_row else ""
    return [
        "",
        f"GEMM floor: {f['tokens_after_sharing']} tokens after prefix sharing and "
        f"{f['scored_positions']} scored positions = {f['gemm_tflop']} TFLOP of "
        f"{f.get('gemm_dtype', 'float32')} matrix "
        f"multiplies, at {f['gemm_rate_gflops']} GFLOP/s (this machine, the model's own layer "
        f"shapes, 1024 rows) = {f['floor_s']:.2f} s{ratio}.",
    ]


def _label(row: dict[str, Any], env: dict[str, Any]) -> str:
    if row["method"] == "ape":
        return f"ape (`lm.loglikelihood`, {env['ape_max_batch_tokens']}-token batches)"
    if row["method"] == "naive":
        return "naive (one forward pass per request)"
    return f"lm-eval HFLM, batch size {row['batch_size']}"


# ---------------------------------------------------------------------------- main


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _method_list(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = set(names) - set(METHODS)
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"methods must be among {', '.join(METHODS)}")
    return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: 2×5 requests, 1 repeat")
    p.add_argument("--repeats", type=int, help="timed runs per method (default 3, quick 1)")
    p.add_argument("--methods", type=_method_list, default=METHODS, help="comma-separated")
    p.add_argument("--lmeval-batch-sizes", type=_int_list, help="default 1,8,16,32,64 (quick 1,8)")
    p.add_argument("--workload", choices=WORKLOADS, default="human", help="see workloads.py")
    p.add_argument("--instructions", type=int, help="number of prompts (default 20, quick 2)")
    p.add_argument("--examples", type=int, help="examples per instruction (default 50, quick 5)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="the model's dtype (bfloat16: the opt-in fast mode)",
    )
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="instruction_induction dir")
    p.add_argument("--out", type=Path, help="default benchmarks/results/scoring[-WORKLOAD].json")
    return p.parse_args(argv)


def quiet_libraries() -> None:
    # lm-eval warns about a pre-built model on every HFLM; transformers shows a loading bar.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    config = QUICK if args.quick else FULL
    repeats = args.repeats or config.repeats
    n_instructions = args.instructions or config.instructions
    n_examples = args.examples or config.examples
    batch_sizes = args.lmeval_batch_sizes or config.lmeval_batch_sizes
    out: Path = args.out or config.default_out
    if args.out is None and args.workload != "human":
        out = out.with_name(f"{out.stem}-{args.workload}.json")

    torch.set_num_threads(args.threads)
    quiet_libraries()
    if "lmeval" in args.methods and package_version("lm_eval") is None:
        raise SystemExit("lm-eval is not installed: pip install -e '.[bench]'")

    workload = build_workload(args.data.resolve(), args.workload, n_instructions, n_examples)
    lm = ape.load_model(device="cpu", dtype=args.dtype)
    rate = gemm_rate(lm.model)  # measured before the timed runs, on an idle machine
    methods = make_methods(lm, args.methods, batch_sizes)
    load_before = os.getloadavg()[0]
    if load_before >= 1.0:
        # Measured here: 2-thread torch runs slow down 5-20x when another process holds a core.
        print(
            f"warning: 1-min load average is {load_before:.2f}; other processes are using the "
            "CPU, so timings will be unreliable",
            file=sys.stderr,
        )
    run_all(methods, workload.requests, repeats, args.threads)

    report = {
        "benchmark": "scoring",
        "quick": args.quick,
        "repeats": repeats,
        "workload": {
            "data": str(args.data.resolve()),
            "n_instructions": n_instructions,
            "n_examples": n_examples,
            "n_requests": len(workload.requests),
            "name": args.workload,
            "prompts_per_task": PER_TASK,
            "warmup_requests": WARMUP_REQUESTS,
            **token_stats(lm, workload.requests),
            "prompts": workload.prompts,
        },
        "environment": environment(lm, args.threads, load_before),
        "summary": summarize(methods, len(workload.requests)),
        "floor": floor(lm, workload.requests, rate),
    }
    text = markdown(report)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(text, encoding="utf-8")
    print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)


if __name__ == "__main__":
    main()
