"""A UCB bandit that spends scoring budget on the candidates most likely to be the best.

Every candidate walks the same seeded order of validation examples, `minibatch` at a time, so each
pull scores a candidate on examples it has not seen and candidates are compared on the same
examples. The upper confidence bound is

    mean_i + c * sigma * sqrt(ln N / n_i)

with n_i the examples candidate i has been scored on, N the total over all candidates, and sigma
the standard deviation of all per-example scores seen so far. Scaling by sigma makes `c`
unit-free: the same default works for log-likelihoods (nats) and accuracies (0..1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ape.objective import Objective
from ape.prompt import Prompt


@dataclass
class Arm:
    prompt: Prompt
    origin: str
    scores: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return float(np.mean(self.scores)) if self.scores else float("-inf")


class UCBBandit:
    """Arms are prompts; a pull scores one arm on its next `minibatch` validation examples."""

    def __init__(self, objective: Objective, minibatch: int, c: float):
        self.objective = objective
        self.minibatch = minibatch
        self.c = c
        self.arms: dict[str, Arm] = {}

    def add(self, prompts: list[Prompt], origin: str) -> None:
        self.objective.add_candidates(prompts, origin)
        for prompt in prompts:
            self.arms.setdefault(prompt.key(), Arm(prompt, origin))

    def open_arms(self) -> list[Arm]:
        """Arms with validation examples left to see."""
        limit = len(self.objective.val_order)
        return [a for a in self.arms.values() if len(a.scores) < limit]

    def upper_bounds(self, arms: list[Arm]) -> np.ndarray:
        seen = [s for a in self.arms.values() for s in a.scores]
        total = len(seen)
        sigma = float(np.std(seen)) if total > 1 else 1.0
        bounds = []
        for arm in arms:
            if not arm.scores:
                bounds.append(math.inf)
                continue
            bonus = self.c * sigma * math.sqrt(math.log(max(total, 2)) / len(arm.scores))
            bounds.append(arm.mean + bonus)
        return np.array(bounds)

    def round(self, per_round: int) -> None:
        """Pull the `per_round` open arms with the highest upper bounds (ties: first added)."""
        arms = self.open_arms()
        if not arms:
            return
        bounds = self.upper_bounds(arms)
        order = sorted(range(len(arms)), key=lambda i: -bounds[i])[:per_round]
        chosen = [arms[i] for i in order]
        requests = []
        for arm in chosen:
            start = len(arm.scores)
            requests.append((arm.prompt, self.objective.val_order[start : start + self.minibatch]))
        try:
            self.objective.evaluate_each(requests)
        finally:
            self.absorb(chosen)

    def absorb(self, arms: list[Arm]) -> None:
        """Read the arms' scores back from the objective (also after a budget stop mid-round)."""
        for arm in arms:
            known = self.objective.candidates.get(arm.prompt.key())
            if known is None:
                continue
            ordered = []
            for example in self.objective.val_order:
                score = known.val.get(example.key())
                if score is None:
                    break
                ordered.append(score)
            arm.scores = ordered

    def run(self, rounds: int, per_round: int) -> None:
        for _ in range(rounds):
            if not self.open_arms():
                return
            self.round(per_round)

    def top(self, k: int) -> list[Arm]:
        """The k pulled arms with the highest mean score."""
        pulled = [a for a in self.arms.values() if a.scores]
        return sorted(pulled, key=lambda a: -a.mean)[:k]


def stage_rounds(
    objective: Objective,
    *,
    rounds: int,
    per_round: int,
    minibatch: int,
    finalists: int,
    stages: int,
    resample_tokens: int,
) -> int:
    """Bandit rounds per stage: `rounds`, or with a budget, sized to fill what is left after the
    finalists' full evaluation and the resampling's generated tokens, over `stages` stages."""
    if objective.budget.limit is None:
        return rounds
    final = finalists * len(objective.val_pool)
    spare = objective.budget.remaining - final - resample_tokens
    return max(1, int(spare / stages // (per_round * minibatch)))
