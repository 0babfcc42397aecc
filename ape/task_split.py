"""Holding out val and test rows from the training rows, seeded, and the checks around it."""

from __future__ import annotations

import math
import warnings

from sklearn.model_selection import train_test_split

from ape.task_types import Example, Task, TaskError, short


def _split_sizes(n: int, fraction: float) -> tuple[int, int]:
    """(kept, held out) when `fraction` of `n` rows is held out, rounding the held-out part up."""
    held = math.ceil(fraction * n)
    return n - held, held


def rows_needed(fractions: list[float]) -> int:
    """Fewest rows that leave every split non-empty after holding out `fractions` in turn."""
    n = 1
    while True:
        remaining, ok = n, True
        for fraction in fractions:
            remaining, held = _split_sizes(remaining, fraction)
            ok = ok and held >= 1
        if ok and remaining >= 1:
            return n
        n += 1


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raise ValueError unless both fractions lie strictly between 0 and 1."""
    for label, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < fraction < 1:
            raise ValueError(f"{label} must be between 0 and 1 (exclusive), got {fraction}")


def check_enough(train: list[Example], source: object, held: dict[str, float]) -> None:
    """Raise TaskError unless `train` can give up `held` (split name -> fraction, in order)."""
    needed = rows_needed(list(held.values()))
    if len(train) < needed:
        names = " and ".join(held)
        raise TaskError(
            f"{source}: found {len(train)} example{'s' if len(train) != 1 else ''}, need at "
            f"least {needed} to keep a train split" + (f" and hold out {names}" if names else "")
        )


def hold_out(
    examples: list[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(kept, held out): `fraction` of `examples` (rounded up) held out by a seeded shuffle."""
    _, held = _split_sizes(len(examples), fraction)
    kept, out = train_test_split(examples, test_size=held, random_state=seed)
    return list(kept), list(out)


def warn_leakage(task: Task) -> None:
    """Warn when test inputs also occur in train: the test score would be optimistic."""
    train_inputs = {ex.input for ex in task.train}
    leaked = [ex.input for ex in task.test if ex.input in train_inputs]
    if leaked:
        warnings.warn(
            f"task {task.name!r}: {len(leaked)} test example{'s' if len(leaked) > 1 else ''} "
            f"share an input with train (e.g. {short(leaked[0])!r}); "
            "test scores may be optimistic",
            stacklevel=3,
        )
