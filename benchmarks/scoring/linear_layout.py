"""Weight-left linear layers (ape/cpu_linear.py) against plain `nn.Linear`, side by side.

Usage:
    python benchmarks/scoring/linear_layout.py [--repeats 3] [--threads 2]
        [--out benchmarks/results/linear_layout.json]

Two copies of the embedded model (fp32, CPU): `plain` (`nn.Linear`, x @ W.T) and `weight-left`
(the same weights, W @ x.T up to 64 rows). Timed, round robin over
the two, one repeat at a time, medians reported:
- `layers m=R`: every linear layer of the model once, on R rows (weights read from memory, as in
  a forward pass);
- `decode`: 2 proposal prompts (5 antonyms demos) x 8 samples x 32 new tokens, EOS suppressed,
  so both generate the same number of tokens;
- `scoring`: 10 few-shot prompts (5 demos) x 50 examples through `loglikelihood`, prefix cache
  off (each call computes its prefixes).
The scores of the two copies are compared (max |difference|).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from ape.search.proposal import proposal_prompt

from ape.cpu_linear import use_weight_left
from ape.decoding import Sampling
from ape.device import describe_machine, machine_line
from ape.lm import HFLanguageModel
from ape.models import load_model
from ape.prompt import Prompt
from ape.shared_generation import generate_tokens
from ape.task import read_examples

sys.path.insert(0, str(Path(__file__).resolve().parent))
from floor import linear_pass  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / ".." / "shared" / "data" / "instruction_induction" / "antonyms"
ROWS = (1, 8, 32, 64, 128, 512)


def decode_job(lm: HFLanguageModel, train) -> Callable[[], None]:
    texts = [proposal_prompt(train[5 * i : 5 * i + 5]) for i in range(2)]
    tokens = [lm.tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    sampling = Sampling(temperature=0.9, seed=1, max_new_tokens=32)  # no EOS: 32 tokens each

    def run() -> None:
        generate_tokens(lm.model, lm.tokenizer, tokens, sampling, n=8)

    return run


def scoring_requests(train) -> list[tuple[str, str]]:
    requests = []
    for p in range(10):
        demos = tuple(train[100 + 5 * p : 105 + 5 * p])
        requests += Prompt("", demos=demos).requests(train[:50])
    return requests


def timed(job: Callable[[], None]) -> float:
    began = time.perf_counter()
    with torch.inference_mode():
        job()
    return time.perf_counter() - began


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/linear_layout.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    os.environ["APE_WEIGHT_LEFT"] = "0"
    plain = load_model(device="cpu", dtype="float32")
    fast_model = copy.deepcopy(plain.model)
    print(f"swapped {use_weight_left(fast_model)} linear layers", file=sys.stderr)
    lms = {
        "plain": HFLanguageModel(plain.model, plain.tokenizer, prefix_cache_bytes=0),
        "weight-left": HFLanguageModel(fast_model, plain.tokenizer, prefix_cache_bytes=0),
    }
    train = read_examples(DATA / "train.jsonl")
    requests = scoring_requests(train)
    jobs: dict[str, dict[str, Callable[[], None]]] = {name: {} for name in lms}
    scores: dict[str, np.ndarray] = {}
    for name, lm in lms.items():
        for rows in ROWS:
            layers = [m for m in lm.model.modules() if isinstance(m, torch.nn.Linear)]
            jobs[name][f"layers m={rows}"] = linear_pass(layers, rows)
        jobs[name]["decode"] = decode_job(lm, train)
        jobs[name]["scoring"] = lambda lm=lm, name=name: scores.__setitem__(
            name, np.asarray(lm.loglikelihood(requests))
        )
        for job in jobs[name].values():  # untimed warm-up
            timed(job)
    times: dict[str, dict[str, list[float]]] = {n: {j: [] for j in jobs[n]} for n in jobs}
    for _ in range(args.repeats):
        for job in jobs["plain"]:
            for name in lms:
                times[name][job].append(timed(jobs[name][job]))
    rows = []
    for job in jobs["plain"]:
        a, b = (statistics.median(times[n][job]) for n in lms)
        rows.append({"workload": job, "plain_s": a, "weight_left_s": b, "speedup": a / b})
    report = {
        "date": dt.date.today().isoformat(),
        "machine": describe_machine("cpu"),
        "model": "smollm2-135m (fp32)",
        "repeats": args.repeats,
        "scoring_requests": len(requests),
        "max_abs_score_difference": float(np.abs(scores["plain"] - scores["weight-left"]).max()),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Linear layout: plain vs weight-left ({report['date']})",
        "",
        f"{machine_line(report['machine'])}; {report['model']}; medians of {args.repeats}; "
        f"scores differ by at most {report['max_abs_score_difference']:.2e}",
        "",
        "| workload | plain (s) | weight-left (s) | speed-up |",
        "|---|---|---|---|",
        *(
            f"| {r['workload']} | {r['plain_s']:.3f} | {r['weight_left_s']:.3f} | "
            f"{r['speedup']:.2f}x |"
            for r in rows
        ),
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
