"""The held-out evidence for a result: the best prompt against each baseline, with an interval.

A comparison is paired: both prompts are scored on the same test examples, so the interval is a
bootstrap over examples of the per-example difference (scipy's `bootstrap`, percentile method,
seeded). An interval above 0 says the best prompt beats that baseline on examples like these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 2000

# Candidate origins that mark a baseline, and the name a comparison gives it.
BASELINE_PREFIX = "baseline: "
NO_INSTRUCTION = "no instruction"


@dataclass(frozen=True)
class Comparison:
    """best − baseline on the test split under one score, with its paired bootstrap interval."""

    baseline: str  # e.g. "no instruction", "best human instruction", "5 random demos"
    score: str  # "loglik", "choice", or a metric name such as "em"
    diff: float
    low: float
    high: float
    examples: int

    def line(self) -> str:
        interval = f"[{self.low:+.4g}, {self.high:+.4g}]"
        return f"best vs {self.baseline} ({self.score}): {self.diff:+.4g} {interval}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def paired_interval(
    best: Sequence[float], other: Sequence[float], seed: int = 0
) -> tuple[float, float, float]:
    """Mean of best − other and its 95% paired bootstrap interval over examples."""
    diff = np.asarray(best, dtype=np.float64) - np.asarray(other, dtype=np.float64)
    if diff.size == 0:
        raise ValueError("no paired test examples to compare")
    mean = float(diff.mean())
    if diff.size == 1 or np.all(diff == diff[0]):
        return mean, mean, mean  # no spread to resample
    found = stats.bootstrap(
        (diff,),
        np.mean,
        confidence_level=CONFIDENCE,
        n_resamples=RESAMPLES,
        method="percentile",
        random_state=np.random.default_rng(seed),
    )
    return mean, float(found.confidence_interval.low), float(found.confidence_interval.high)


def compare(
    baseline: str, score: str, best: Sequence[float], other: Sequence[float], seed: int = 0
) -> Comparison:
    diff, low, high = paired_interval(best, other, seed)
    return Comparison(baseline, score, diff, low, high, len(best))


def baseline_name(origin: str) -> str | None:
    """The comparison name of a baseline candidate's origin (None: not a baseline)."""
    if origin == "reference" or origin == "none":
        return NO_INSTRUCTION
    if not origin.startswith(BASELINE_PREFIX):
        return None
    name = origin.removeprefix(BASELINE_PREFIX)
    return "best human instruction" if name == "human" else name
