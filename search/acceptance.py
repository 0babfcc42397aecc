"""When a searched change may replace what a search started from.

At a few shots a margin of two examples out of 32 is noise, and a soft prompt or label-word set
kept on such a margin has ended below its start on test. `paired_gain` asks for more: a higher
mean, and more examples improved than worsened by a one-sided exact sign test.

`label_entropy` is the other evidence a classifier can give: no answer that ignores the input
reaches a cross-entropy below the entropy of the labels, so a validation loss under it shows the
prompt reads the input (a prompt that collapsed onto one label cannot get there).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import binomtest, entropy

ACCEPT_P = 0.05  # the default level


def paired_gain(
    new: Sequence[float], old: Sequence[float], alpha: float, below_chance: bool = False
) -> dict[str, Any]:
    """Whether `new` beats `old` on the same examples: higher mean, and more examples where it
    scores higher than lower by a one-sided exact sign test at level `alpha` (ties drop out, so
    it suits 0/1 correctness and continuous scores alike). `alpha` 1: the mean alone decides."""
    diff = np.asarray(new, dtype=float) - np.asarray(old, dtype=float)
    wins, losses = int((diff > 0).sum()), int((diff < 0).sum())
    p = binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue if wins + losses else 1.0
    better = float(diff.mean()) > 0 if diff.size else False
    return {
        "wins": wins,
        "losses": losses,
        "p_value": round(float(p), 6),
        "alpha": alpha,
        "better": bool(better),
        "accepted": passes(bool(better), float(p), alpha, below_chance),
    }


def passes(better: bool, p_value: float, alpha: float, below_chance: bool = False) -> bool:
    """The acceptance rule: a higher mean, and either the sign test at level `alpha` (1: the mean
    alone) or a validation loss below the labels' entropy (`label_entropy`)."""
    return better and (alpha >= 1 or p_value < alpha or below_chance)


def label_entropy(labels: Sequence[str]) -> float:
    """The entropy (nats) of these labels' frequencies: the lowest cross-entropy an answer that
    ignores the input can reach on them (log K for K balanced labels)."""
    if not labels:
        raise ValueError("label_entropy needs at least one label")
    return float(entropy(list(Counter(labels).values())))


def check_level(name: str, alpha: float) -> None:
    """One line for a level outside (0, 1]."""
    if not 0 < alpha <= 1:
        raise ValueError(f"{name} must be in (0, 1], not {alpha}")
