"""Generation throughput: ape's shared-prompt decoding loop vs `model.generate`.

Usage:
    python benchmarks/generation/run.py [--repeats 3] [--workloads proposal,ape-proposal,evidence]
        [--examples 100] [--threads N] [--device cpu] [--out benchmarks/results/generation]

Workloads, on Instruction Induction's `antonyms` (../shared/data/instruction_induction):
- proposal: what the default `whole` searcher generates. 2 subsamples of 5 demos, 4 proposals
  each, per template (forward completion and chat); then resampling: 3 instructions, 2
  rephrasings each, per template. Temperature 0.9, top_p 1, 32 new tokens at most, stop at a
  newline, in the chunks ape/generation_cache.py makes (32 sequences at most). ape samples a
  step's chunks (both templates) in one decoding run (`Objective.generate_ahead`); before, each
  chunk was a `model.generate` call of its own.
- ape-proposal: the `ape` searcher's proposals: 5 subsamples x 8 proposals per template.
- evidence: the metric evidence, greedy: 5 prompts (an instruction or none, 5 to 8 demos) x the
  test examples, 32 new tokens at most, stop at a newline (GenerationEvaluator's settings).

Methods: `shared` is ape's loop (ape/shared_generation.py), one run per step; `hf` is
`model.generate` with `num_return_sequences` and left padding, 16 prompts per call, one call per
chunk (what ape did before). Each workload
runs twice: `as run` (stop string and EOS, as a search runs it: sampled lengths differ between
the methods, so tokens/s is the fair rate) and `fixed` (no stop, EOS suppressed: both methods
generate exactly max_new_tokens per sample, the same samples and tokens). Timed runs go round
robin over the methods, one repeat at a time; medians are reported.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from ape.search.proposal import proposal_prompt, resample_prompt

import ape.hf_generate as hf_generate
from ape.decoding import Sampling
from ape.device import describe_machine, machine_line
from ape.models import load_model
from ape.prompt import Prompt
from ape.shared_generation import generate_tokens
from ape.storage import content_hash
from ape.task import read_examples

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / ".." / "shared" / "data" / "instruction_induction" / "antonyms"
RESULTS = REPO / "benchmarks" / "results" / "generation"
CHUNK_SEQUENCES = 32  # ape/generation_cache.py's chunk: sequences per generate call
HF_BATCH = 16  # prompts per model.generate call, ape's former default
WORKLOADS = ("proposal", "ape-proposal", "evidence")


@dataclass(frozen=True)
class Call:
    prompts: list[str]
    n: int
    temperature: float
    max_new_tokens: int = 32
    stop: tuple[str, ...] = ("\n",)
    seed: int = 0
    step: int = 0  # the calls of one step are sampled in one run by ape


def chunked(prompts: list[str], n: int, **settings: Any) -> list[Call]:
    """The chunks generation_cache makes: CHUNK_SEQUENCES // n prompts each."""
    size = max(1, CHUNK_SEQUENCES // n)
    chunks = [prompts[i : i + size] for i in range(0, len(prompts), size)]
    # Seeded by the run's seed (0) and the chunk's text, as generation_cache does.
    return [Call(c, n, seed=int(content_hash([0, c], 8), 16), **settings) for c in chunks]


def proposal_calls(lm, train, subsamples: int, proposals: int, rephrase: int) -> list[Call]:
    """Proposals per template, then `rephrase` instructions x 2 variations per template."""
    rng = np.random.default_rng(0)
    sets = [[train[i] for i in rng.choice(len(train), 5, replace=False)] for _ in range(subsamples)]
    instructions = ["Write the opposite of the word.", "Give an antonym.", "Output the reverse."]
    calls: list[Call] = []
    for chat in (False, True):
        prompts = [proposal_prompt(demos, chat=chat) for demos in sets]
        prompts = [lm.chat_prompt(p) for p in prompts] if chat else prompts
        calls += chunked(prompts, proposals, temperature=0.9)
    for chat in (False, True) if rephrase else ():
        prompts = [resample_prompt(text, chat=chat) for text in instructions[:rephrase]]
        prompts = [lm.chat_prompt(p) for p in prompts] if chat else prompts
        calls += chunked(prompts, 2, temperature=0.9, step=1)
    return calls


def evidence_calls(train, test, examples: int, instructions: list[str]) -> list[Call]:
    """Greedy answers of 5 prompts (instruction + 5-8 demos, one without instruction)."""
    rng = np.random.default_rng(1)
    prompts = []
    for k, instruction in enumerate(["", *instructions[:4]]):
        demos = tuple(train[i] for i in rng.choice(len(train), 5 + k % 4, replace=False))
        prompts.append(Prompt(instruction, demos))
    texts = [p.render(ex.input) for p in prompts for ex in test[:examples]]
    return [Call(texts, 1, 0.0)]


# ------------------------------------------------------------------------------ the two methods
def run_shared(lm, calls: list[Call], fixed: bool) -> tuple[list[list[str]], int]:
    """ape's loop, the step's calls in one run: texts per prompt and the tokens generated."""
    call = calls[0]  # a step's calls differ in their prompts and seeds only
    sampling = Sampling(
        temperature=call.temperature,
        max_new_tokens=call.max_new_tokens,
        eos=frozenset() if fixed else hf_generate.eos_ids(lm.model, lm.tokenizer),
        stop=() if fixed else call.stop,
    )
    tokens = hf_generate.tokenize(lm.tokenizer, [p for c in calls for p in c.prompts])
    keys = [(c.seed, i) for c in calls for i in range(len(c.prompts))]
    out = generate_tokens(lm.model, lm.tokenizer, tokens, sampling, n=call.n, draws_from=keys)
    texts = [decode(lm, samples, None if fixed else call.stop) for samples in out]
    return texts, sum(len(ids) for samples in out for ids in samples)


def run_hf(lm, calls: list[Call], fixed: bool) -> tuple[list[list[str]], int]:
    """model.generate with num_return_sequences, a call per chunk: texts per prompt and the
    tokens generated."""
    texts: list[list[str]] = []
    count = 0
    for call in calls:
        more, tokens = run_hf_call(lm, call, fixed)
        texts += more
        count += tokens
    return texts, count


def run_hf_call(lm, call: Call, fixed: bool) -> tuple[list[list[str]], int]:
    eos = hf_generate.eos_ids(lm.model, lm.tokenizer)
    texts: list[list[str]] = []
    count = 0
    with torch.random.fork_rng():
        torch.manual_seed(call.seed)
        for start in range(0, len(call.prompts), HF_BATCH):
            ids = hf_generate.reference_tokens(
                lm.model,
                lm.tokenizer,
                call.prompts[start : start + HF_BATCH],
                call.n,
                call.temperature,
                1.0,
                call.max_new_tokens,
                None if fixed else list(call.stop),
                **({"min_new_tokens": call.max_new_tokens} if fixed else {}),
            ).tolist()
            # A finished row is padded with EOS (the pad) to the batch's length: not generated.
            rows = [until_eos(row, eos) for row in ids]
            count += sum(len(row) for row in rows)
            flat = decode(lm, rows, None if fixed else call.stop)
            texts += [flat[i : i + call.n] for i in range(0, len(flat), call.n)]
    return texts, count


def until_eos(row: list[int], eos: frozenset[int]) -> list[int]:
    return row[: next((k for k, t in enumerate(row) if t in eos), len(row))]


def decode(lm, rows: list[list[int]], stop) -> list[str]:
    texts = lm.tokenizer.batch_decode(rows, skip_special_tokens=True)
    return [hf_generate.cut_at(t, stop) for t in texts]


METHODS: dict[str, Callable[..., tuple[list[list[str]], int]]] = {
    "shared": run_shared,
    "hf": run_hf,
}


# ------------------------------------------------------------------------------ timing
class Passes:
    """Counts the decoder's forward passes and the positions they compute (padding included)."""

    def __init__(self, model):
        self.passes = self.positions = 0
        self.handle = model.base_model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.passes += 1
        self.positions += kwargs["input_ids"].numel()


def measure(lm, calls: list[Call], fixed: bool, repeats: int) -> dict[str, Any]:
    """Round-robin timed repeats of every method over the workload's calls, step by step."""
    steps = [[c for c in calls if c.step == s] for s in sorted({c.step for c in calls})]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in METHODS}
    for _ in range(repeats):
        for name, method in METHODS.items():
            passes = Passes(lm.model)
            began = time.perf_counter()
            results = [method(lm, step, fixed) for step in steps]
            seconds = time.perf_counter() - began
            passes.handle.remove()
            texts = [t for texts, _ in results for t in texts]
            tokens = sum(count for _, count in results)
            runs[name].append(
                {
                    "seconds": seconds,
                    "tokens": tokens,
                    "texts": texts,
                    "passes": passes.passes,
                    "positions": passes.positions,
                }
            )
    samples = sum(len(call.prompts) * call.n for call in calls)
    out: dict[str, Any] = {"samples": samples, "calls": len(calls)}
    for name, repeats_ in runs.items():
        seconds = statistics.median(r["seconds"] for r in repeats_)
        tokens = statistics.median(r["tokens"] for r in repeats_)
        out[name] = {
            "seconds": [round(r["seconds"], 3) for r in repeats_],
            "median_s": round(seconds, 3),
            "tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1),
            "forward_passes": statistics.median(r["passes"] for r in repeats_),
            "positions_computed": statistics.median(r["positions"] for r in repeats_),
            "reproducible": all(r["texts"] == repeats_[0]["texts"] for r in repeats_),
        }
    out["speedup"] = round(out["hf"]["median_s"] / out["shared"]["median_s"], 2)
    out["tokens_per_s_ratio"] = round(out["shared"]["tokens_per_s"] / out["hf"]["tokens_per_s"], 2)
    first = [runs[name][0]["texts"] for name in METHODS]
    same = sum(a == b for a, b in zip(*first, strict=True))
    # Sampled texts differ by design (different random streams): only greedy ones must agree.
    greedy = all(call.temperature == 0 for call in calls)
    out["same_texts"] = f"{same}/{len(first[0])} prompts" if greedy else "sampled"
    return out


def workload(lm, name: str, train, test, args) -> list[Call]:
    if name == "proposal":
        return proposal_calls(lm, train, subsamples=2, proposals=4, rephrase=3)
    if name == "ape-proposal":
        return proposal_calls(lm, train, subsamples=5, proposals=8, rephrase=0)
    meta = json.loads((DATA / "meta.json").read_text())
    return evidence_calls(train, test, args.examples, meta["human_instructions"][-4:])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--examples", type=int, default=100, help="test examples (evidence)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--fixed", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model, device=args.device)
    train, test = read_examples(DATA / "train.jsonl"), read_examples(DATA / "test.jsonl")
    warm = Call(["Input: hot\nOutput:"], 2, 0.9, max_new_tokens=4)
    for method in METHODS.values():  # untimed: one-off set-up (allocator, kernels)
        method(lm, [warm], False)
    report: dict[str, Any] = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "model": args.model,
        "dtype": str(lm.model.dtype).removeprefix("torch."),
        "machine": describe_machine(args.device),
        "load_average_before": os.getloadavg(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "repeats": args.repeats,
        "evidence_examples": args.examples,
        "workloads": {},
    }
    for name in args.workloads.split(","):
        calls = workload(lm, name, train, test, args)
        # Greedy texts are the same for both methods (checked): as run is already like for like.
        greedy = all(call.temperature == 0 for call in calls)
        for fixed in (False, True) if args.fixed and not greedy else (False,):
            key = f"{name} ({'fixed' if fixed else 'as run'})"
            result = measure(lm, calls, fixed, args.repeats)
            report["workloads"][key] = result
            print(f"{key}: {summary(result)}", flush=True)
    report["load_average_after"] = os.getloadavg()
    write(report, args.out)
    return report


def summary(r: dict[str, Any]) -> str:
    shared, hf = r["shared"], r["hf"]
    return (
        f"{r['samples']} samples; shared {shared['median_s']:.2f} s ({shared['tokens']} tok), "
        f"hf {hf['median_s']:.2f} s ({hf['tokens']} tok): {r['speedup']}x time, "
        f"{r['tokens_per_s_ratio']}x tokens/s; same texts {r['same_texts']}; forward passes "
        f"{shared['forward_passes']}/{hf['forward_passes']}, positions "
        f"{shared['positions_computed']}/{hf['positions_computed']}"
    )


def write(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = "generation-" + report["machine"]["device"].split(":")[0]
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Generation: shared-prompt loop vs model.generate ({report['date']})",
        "",
        f"{report['model']} ({report['dtype']}) on {machine_line(report['machine'])}; "
        f"torch {report['versions']['torch']}, transformers {report['versions']['transformers']}; "
        f"median of {report['repeats']}; evidence on {report['evidence_examples']} test "
        "examples. Load average before/after "
        f"{report['load_average_before'][0]:.1f}/{report['load_average_after'][0]:.1f}: "
        "on a machine shared with other jobs the repeats vary; see the JSON for each one.",
        "",
        "| workload | samples | shared s | hf s | speedup | shared tok | hf tok | tok/s ratio "
        "| same texts | passes shared/hf | positions shared/hf |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in report["workloads"].items():
        lines.append(
            f"| {key} | {r['samples']} | {r['shared']['median_s']:.2f} | {r['hf']['median_s']:.2f} "
            f"| {r['speedup']}x | {r['shared']['tokens']} | {r['hf']['tokens']} "
            f"| {r['tokens_per_s_ratio']}x | {r['same_texts']} "
            f"| {r['shared']['forward_passes']}/{r['hf']['forward_passes']} "
            f"| {r['shared']['positions_computed']}/{r['hf']['positions_computed']} |"
        )
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
