"""From a finished search to a `Result`: rank, test the finalists and baselines, compare them.

The finalists (`test_top`) and every baseline the run scored (no instruction, the best human
instruction on validation, the random demos) are scored on the test split. The best prompt is
then compared with each baseline, per test example, with a paired bootstrap interval (see
ape/evidence.py), under the selection score and, where the selection score is not already the
task's metric, under the metric by greedy generation (the best prompt and the baselines only).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import numpy as np

from ape.capabilities import LOGLIK_SCORES, offers
from ape.device import describe_machine
from ape.evidence import NO_INSTRUCTION, Comparison, baseline_name, compare
from ape.objective import Objective
from ape.prompt import Prompt
from ape.prompt_length import prompt_tokens
from ape.ranking import Candidate, ranked, standing
from ape.result import Entry, Result

# Opens an objective that scores with the named evaluator in a study of its own (resumable).
MetricObjective = Callable[[str], Objective]


def baselines(order: list[Candidate]) -> dict[str, Candidate]:
    """Each baseline's name -> its best candidate on validation (the leaderboard is `order`)."""
    found: dict[str, Candidate] = {}
    for candidate in order:
        name = baseline_name(candidate.origin)
        if candidate.prompt == Prompt(""):
            name = NO_INSTRUCTION
        if name is not None and name not in found:
            found[name] = candidate
    return found


def build_result(
    objective: Objective,
    meta: dict[str, Any],
    started: float,
    tested: int,
    *,
    metric_objective: MetricObjective | None = None,
) -> Result:
    """The result of a finished (or interrupted, `tested` 0) search, with its test evidence."""
    pool = [e.key() for e in objective.val_pool]
    tokens = {k: prompt_tokens(objective.lm, c.prompt) for k, c in objective.candidates.items()}
    penalty = objective.length_penalty
    order = ranked(list(objective.candidates.values()), pool, tokens, penalty)
    if tested and not order:
        raise ValueError(
            "nothing was scored: the budget is too small for this searcher "
            f"(used {objective.budget.used} of {objective.budget.limit})"
        )
    found = baselines(order)
    evidence, metric_means = _evidence(objective, order, found, tested, metric_objective)
    reference = found.get(NO_INSTRUCTION)

    def entry(c: Candidate) -> Entry:
        examples, score = standing(c, pool)
        return Entry.of(
            c.prompt,
            val_score=score if c.val else None,
            val_examples=examples,
            test_score=float(np.mean(list(c.test.values()))) if c.test else None,
            test_metric=metric_means.get(c.prompt.key()),
            tokens=tokens.get(c.prompt.key()),
            origin=c.origin,
        )

    leaderboard = [entry(c) for c in order]
    return Result(
        best=leaderboard[0] if leaderboard else None,
        leaderboard=leaderboard,
        budget_used=objective.budget.used,
        history=[list(point) for point in objective.history],
        budget_detail={
            "pairs": objective.budget.pairs,
            "tokens": objective.budget.tokens,
            "pairs_computed": objective.computed_pairs,
        },
        reference=entry(reference) if reference is not None and reference.val else None,
        evidence=[c.to_json() for c in evidence],
        length_penalty=penalty,
        timings={
            "total_s": round(time.perf_counter() - started, 3),
            **{f"{k}_s": round(v, 3) for k, v in objective.seconds.items()},
        },
        machine=describe_machine(getattr(objective.lm, "device", "cpu")),
        extras=dict(objective.extras),
        artifacts=dict(objective.artifacts),
        **meta,
    )


def _evidence(
    objective: Objective,
    order: list[Candidate],
    found: dict[str, Candidate],
    tested: int,
    metric_objective: MetricObjective | None,
) -> tuple[list[Comparison], dict[str, float]]:
    """Score the finalists and baselines on test and compare the best with each baseline; also
    under the task's metric when the selection score is a log-likelihood. Adds the no-instruction
    reference to `found` when the search did not score it. Returns the comparisons and each
    metric-scored prompt's mean metric."""
    if not tested:
        return [], {}
    if NO_INSTRUCTION not in found:  # every result shows the no-instruction reference
        objective.score_evidence([Prompt("")], "val")
        found[NO_INSTRUCTION] = objective.candidates[Prompt("").key()]
    prompts = _unique([c.prompt for c in order[:tested]] + [c.prompt for c in found.values()])
    # A soft prompt's vectors are not generated after.
    generates = metric_objective is not None and order[0].prompt.prefix is None
    generates = generates and offers(objective.evaluator, LOGLIK_SCORES)
    # The metric's greedy answers start from the paths this scoring shows (ape/greedy_paths.py).
    recording = getattr(objective.lm, "recording_greedy_paths", None)
    with recording() if generates and recording is not None else nullcontext():
        objective.score_evidence(prompts, "test")
    evidence = _compare(objective, order[0], found, objective.evaluator.name)
    if not generates:
        return evidence, {}
    # Scoring is over and generation reads no prefix KV: the cache's memory goes to generation.
    clear = getattr(objective.lm, "clear_prefix_cache", None)
    if clear is not None:
        clear()
    metric = metric_objective("generation")
    # Generation is the slow part: the best prompt and the baselines only.
    prompts = _unique([order[0].prompt] + [c.prompt for c in found.values()])
    with objective.timed("metric_evidence"):
        rows = metric.score_evidence(prompts, "test")
    means = {p.key(): float(np.mean(r)) for p, r in zip(prompts, rows, strict=True)}
    name = objective.task.metric
    evidence += _compare(metric, metric.candidates[order[0].prompt.key()], found, name)
    return evidence, means


def _compare(
    objective: Objective, best: Candidate, found: dict[str, Candidate], score: str
) -> list[Comparison]:
    """best − each baseline on the test rows both were scored on (the same rows for all)."""
    mine = objective.candidates[best.prompt.key()].test
    out = []
    for name, candidate in found.items():
        if candidate.prompt == best.prompt:
            continue
        theirs = objective.candidates[candidate.prompt.key()].test
        keys = [k for k in mine if k in theirs]
        a = [mine[k] for k in keys]
        b = [theirs[k] for k in keys]
        out.append(compare(name, score, a, b, seed=objective.seed))
    return out


def _unique(prompts: list[Prompt]) -> list[Prompt]:
    return list({p.key(): p for p in prompts}.values())
