"""The task types: an Example, a Task with its three splits, and the validation of one row.

Every data problem raises `TaskError` with a message that starts with where the bad row is
(``"{path}:{line}"`` for files, ``"row {n}"`` for in-memory data) so a user can jump straight to it.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field, replace
from typing import Any

METRICS = ("em", "contains", "f1", "es", "accuracy")
SPLITS = ("train", "val", "test")
# Test rows a run's evidence is scored on by default, a seeded sample of a larger split: each
# finalist's paired interval is then about +-3 points wide at 95%, and a finalist on 1,000 rows
# takes about a minute with the embedded model on 2 CPU cores (a full AG News split, 7,600 rows
# of 4 labels, would take over ten).
DEFAULT_TEST_EXAMPLES = 1000


class TaskError(ValueError):
    """A problem with task data; the message names the file, line and field."""


@dataclass(frozen=True)
class Example:
    """One input with its reference output and every acceptable output."""

    input: str
    output: str
    answers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        answers = tuple(self.answers)
        # Scoring takes the best match over `answers`, so the reference output must be one of them.
        if self.output not in answers:
            answers = (self.output, *answers)
        object.__setattr__(self, "answers", answers)

    def key(self) -> str:
        """A short content hash: a stored score stays valid exactly as long as this matches."""
        text = json.dumps([self.input, self.output, list(self.answers)], ensure_ascii=False)
        return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


@dataclass
class Task:
    """A named task with its three splits and how to score it."""

    name: str
    train: list[Example]
    val: list[Example]
    test: list[Example]
    metric: str = "em"
    human_instructions: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    # label -> the word scored for it by the `choice` evaluator (default: the label itself)
    verbalizers: dict[str, str] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise TaskError(
                f"task {self.name!r}: unknown metric {self.metric!r} "
                f"(choose one of: {', '.join(METRICS)})"
            )

    def __repr__(self) -> str:
        # The default repr would print every example.
        return (
            f"Task(name={self.name!r}, train={len(self.train)}, val={len(self.val)}, "
            f"test={len(self.test)}, metric={self.metric!r}, seed={self.seed})"
        )

    def split(self, name: str) -> list[Example]:
        """The examples of split `name` ("train", "val" or "test")."""
        if name not in SPLITS:
            raise TaskError(f"unknown split {name!r} (valid: {', '.join(SPLITS)})")
        return getattr(self, name)

    def sample_test(self, rows: int | None, seed: int = 0) -> Task:
        """This task with `rows` test examples drawn without replacement (seeded), in file order.

        For test sets too large to score every finalist on (AG News has 7,600 rows); None keeps
        every row. The label set is fixed from the full task first, so a sample that misses a label
        keeps it as a choice.
        """
        if rows is None:
            return self
        if rows <= 0:
            raise ValueError(f"test_examples must be positive, got {rows}")
        if rows >= len(self.test):
            return self
        picked = sorted(random.Random(seed).sample(range(len(self.test)), rows))
        return replace(
            self,
            test=[self.test[i] for i in picked],
            labels=self.labels or self.distinct_outputs(),
        )

    def distinct_outputs(self) -> list[str]:
        """Sorted distinct outputs over all splits (the label set of a classification task)."""
        return sorted({ex.output for ex in (*self.train, *self.val, *self.test)})


def type_name(value: object) -> str:
    """A value's type as a JSON user reads it: None is "null"."""
    return "null" if value is None else type(value).__name__


def short(text: str, limit: int = 40) -> str:
    """`text` cut to `limit` characters for a message."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def example_from_row(row: Any, where: str, expected: str = "a JSON object") -> Example:
    """Validate one parsed row; `where` is the location prefix of error messages ("path:line")."""
    if not isinstance(row, dict):
        raise TaskError(f"{where}: expected {expected}, got {type_name(row)}")
    values: dict[str, str] = {}
    for key in ("input", "output"):
        if key not in row:
            raise TaskError(f"{where}: missing field {key!r}")
        value = row[key]
        if not isinstance(value, str):
            raise TaskError(f"{where}: field {key!r} must be a string, got {type_name(value)}")
        if not value.strip():
            raise TaskError(f"{where}: field {key!r} is empty")
        values[key] = value
    answers = row.get("answers")
    if answers is None:
        answers = []
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise TaskError(f"{where}: field 'answers' must be a list of strings")
    return Example(values["input"], values["output"], tuple(answers))
