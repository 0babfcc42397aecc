"""The budget: a hard cap on scored (prompt, example) pairs plus generated tokens.

Accounting is logical, not physical: a pair the run asks for costs one unit the first time this
run asks for it, whether it was computed now or replayed from storage. So an interrupted and
resumed run spends exactly what an uninterrupted one does and makes the same decisions.

The run's counts (budget, validation pool, finalists, test sample) are checked here, once, by
`check_counts`: the CLI, bench and `optimize()` all call it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

Pair = tuple[str, str]  # (prompt key, example key)


class BudgetExhausted(Exception):
    """The budget cap is reached; what fit under it was scored and recorded."""


def check_counts(prefix: str = "", **counts: int | None) -> None:
    """Raise ValueError for a count that is set but not positive (None means "not set").

    `prefix` is how the caller spells a setting in its message: "" for `optimize()`'s keyword
    arguments, "--" for CLI flags (whose underscores become dashes).
    """
    for name, value in counts.items():
        if value is None or value > 0:
            continue
        shown = prefix + (name.replace("_", "-") if prefix == "--" else name)
        unit = " number of units" if name == "budget" else ""
        raise ValueError(f"{shown} must be {'a ' if unit else ''}positive{unit}, got {value}")


@dataclass
class Budget:
    """Scored (prompt, example) pairs plus generated tokens, capped at `limit` (None: no cap).

    `bar`, when given, is a progress bar advanced by every unit spent.
    """

    limit: int | None = None
    pairs: int = 0
    tokens: int = 0
    bar: Any = field(default=None, repr=False, compare=False)
    _charged: set[Pair] = field(default_factory=set, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_counts(budget=self.limit)

    @property
    def used(self) -> int:
        return self.pairs + self.tokens

    @property
    def remaining(self) -> float:
        return float("inf") if self.limit is None else self.limit - self.used

    def exhausted(self) -> BudgetExhausted:
        return BudgetExhausted(f"budget of {self.limit} units reached")

    def charged(self, pair: Pair) -> bool:
        """Whether this run has paid for `pair` (so it may be scored and shown)."""
        return pair in self._charged

    def charge_pairs(self, pairs: Iterable[Pair]) -> bool:
        """Charge one unit per pair new to this run, in order, as far as the budget goes.

        Returns True when some new pairs did not fit (they stay uncharged and unscored).
        """
        new = list(dict.fromkeys(p for p in pairs if p not in self._charged))
        allowed = len(new)
        if self.limit is not None:
            allowed = int(min(allowed, self.remaining))
        self._charged.update(new[:allowed])
        self._spend(pairs=allowed)
        return allowed < len(new)

    def charge(self, units: int) -> None:
        """Spend `units` on compute no trial records; raise, spending nothing, if they don't fit."""
        if units > self.remaining:
            raise self.exhausted()
        self._spend(pairs=units)

    def affordable(self, count: int, reserve: int) -> int:
        """How many of `count` jobs that each reserve `reserve` units the budget can start."""
        if self.limit is None:
            return count
        return min(count, int(self.remaining // reserve))

    def add_tokens(self, tokens: int) -> None:
        self._spend(tokens=tokens)

    def _spend(self, pairs: int = 0, tokens: int = 0) -> None:
        self.pairs += pairs
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(pairs + tokens)
