"""What the conformance suites and the chaos test need to run any registered plugin: its small
test options, an evaluator that serves it, its options as CLI flags, and a leaderboard to compare.

Nothing here names a searcher or an evaluator: each brings what it needs (the searcher's
`test_options` classmethod, `needs`, its fields; the evaluator's `offers`).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

from ape.evaluators.base import EVALUATORS, available_evaluators

import ape
from ape.capabilities import mismatch
from ape.options import options_of
from ape.result import Entry

DEFAULT_EVALUATOR: str = inspect.signature(ape.optimize).parameters["evaluator"].default
SCORE_TOLERANCE = 1e-6  # a score recomputed in another batch may differ in the last bits


def small_options(searcher_class: type) -> dict[str, Any]:
    """The searcher's own small options (its `test_options` classmethod), or none: defaults."""
    provide = getattr(searcher_class, "test_options", None)
    return dict(provide()) if provide is not None else {}


def evaluator_for(searcher_class: type) -> str:
    """The default evaluator if it serves the searcher, else the first registered one that does
    (by the capabilities each declares)."""
    names = [DEFAULT_EVALUATOR] + [n for n in available_evaluators() if n != DEFAULT_EVALUATOR]
    for name in names:
        if mismatch(searcher_class, EVALUATORS.load(name)) is None:
            return name
    raise LookupError(f"no registered evaluator serves {mismatch(searcher_class, object())}")


def cli_flags(searcher_class: type, options: dict[str, Any]) -> list[str]:
    """`options` as `ape optimize` flags, written from the searcher's options schema."""
    by_name = {option.name: option for option in options_of(searcher_class)}
    flags: list[str] = []
    for name, value in options.items():
        option = by_name[name]
        if option.kind.boolean:
            flags.append(option.flag if value else "--no-" + option.flag[2:])
        elif option.kind.repeatable:
            flags += [part for item in value for part in (option.flag, str(item))]
        else:
            flags += [option.flag, "none" if value is None else str(value)]
    return flags


def rows(entries: list[Entry]) -> list[tuple]:
    """A leaderboard as comparable rows: what each entry is, then its scores."""
    return [
        (e.instruction, e.demos, e.origin, e.val_examples, e.val_score, e.test_score)
        for e in entries
    ]


def same_leaderboard(got: list[Entry], expected: list[Entry]) -> bool:
    """Equal prompts, origins and evidence in the same order; scores equal to 1e-6."""
    if len(got) != len(expected):
        return False
    for a, b in zip(rows(got), rows(expected), strict=True):
        if a[:4] != b[:4]:
            return False
        for x, y in zip(a[4:], b[4:], strict=True):
            if (x is None) != (y is None) or (
                x is not None and not math.isclose(x, y, rel_tol=0, abs_tol=SCORE_TOLERANCE)
            ):
                return False
    return True
