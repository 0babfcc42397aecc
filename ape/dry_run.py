"""`ape optimize --dry-run`: what a searcher's schedule will spend, and how long that should take
here, from rates measured on this machine with the task's own examples. Nothing is stored."""

from __future__ import annotations

import argparse
import time

from ape.lm import LanguageModel
from ape.prompt import Prompt
from ape.task import Task

# Measured: prompts × examples scored in one call, like a bandit round's pulls, and samples drawn.
PROBE_PROMPTS, PROBE_EXAMPLES, PROBE_SAMPLES, PROBE_TOKENS = 4, 10, 4, 16


def measure_rates(task: Task, lm: LanguageModel) -> tuple[float, float]:
    """(scored pairs per second, generated tokens per second) on this machine, for this task."""
    train, val = task.train, task.val[:PROBE_EXAMPLES]
    prompts = [Prompt("", tuple(train[i : i + 5])) for i in range(PROBE_PROMPTS)]
    requests = [(p.context(e.input), p.continuation(e.output)) for p in prompts for e in val]
    lm.loglikelihood(requests[:2])  # the first call pays for one-off set-up: not timed
    began = time.perf_counter()
    lm.loglikelihood(requests)
    pair_rate = len(requests) / (time.perf_counter() - began)
    began = time.perf_counter()
    lm.generate(
        [prompts[0].context(val[0].input)],
        n=PROBE_SAMPLES,
        temperature=1.0,
        max_new_tokens=PROBE_TOKENS,
        seed=0,
    )
    token_rate = PROBE_SAMPLES * PROBE_TOKENS / (time.perf_counter() - began)
    return pair_rate, token_rate


def print_plan(searcher, task: Task, lm: LanguageModel, args: argparse.Namespace) -> None:
    """Print the planned spend and the time it should take; the run itself is not started."""
    pool = min(args.val_examples, len(task.val))
    schedule = getattr(searcher, "schedule", None)
    if args.budget is not None:
        plan = {"pairs": args.budget, "tokens": 0}
        how = f"--budget {args.budget} (a hard cap: pairs plus tokens)"
    elif schedule is not None:
        templates = 2 if getattr(getattr(lm, "tokenizer", None), "chat_template", None) else 1
        if getattr(searcher, "templates", "auto") in ("forward", "chat"):
            templates = 1
        plan = schedule(task, pool, templates)
        how = "its default schedule (at most)"
    else:
        print(f"searcher {searcher.name!r} has no fixed schedule; --budget N caps what it spends")
        return
    test_rows = min(args.test_examples or len(task.test), len(task.test))
    evidence = (args.test_top + 3) * test_rows  # finalists and up to three baselines
    pair_rate, token_rate = measure_rates(task, lm)
    search_s = plan["pairs"] / pair_rate + plan["tokens"] / token_rate
    evidence_s = evidence / pair_rate
    print(f"{task.name}: searcher {searcher.name}, {how}")
    print(f"  scored pairs:     {plan['pairs']}  (validation pool {pool})")
    print(f"  generated tokens: {plan['tokens']}")
    print(f"  test evidence:    about {evidence} pairs on {test_rows} test rows")
    print(f"  measured here:    {pair_rate:.0f} pairs/s, {token_rate:.0f} tokens/s ({lm.name})")
    print(
        f"  estimate:         {search_s / 60:.1f} min search + {evidence_s / 60:.1f} min test "
        "evidence (before metric generation)"
    )
