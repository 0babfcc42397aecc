"""Scoring the pairs no store holds: here, or through workers when a run has some.

Every score computed is recorded as a trial at once, so nothing is computed twice, even across
an interrupted run.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ape.capabilities import LABEL_LOGPROBS, offers
from ape.lm import LanguageModel
from ape.prefix import by_prefix, score_prompts
from ape.prompt import Prompt
from ape.study import TrialStore
from ape.task import Example

Pair = tuple[str, str]  # (prompt key, example key)


@dataclass
class Keyed:
    """A prompt and its examples, with the content keys the store is indexed by."""

    prompt: Prompt
    examples: list[Example]
    key: str = ""
    example_keys: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.key = self.prompt.key()
        self.example_keys = [e.key() for e in self.examples]

    def pairs(self) -> list[Pair]:
        return [(self.key, ek) for ek in self.example_keys]


def pairs_of(keyed: Sequence[Keyed]) -> list[Pair]:
    return [pair for r in keyed for pair in r.pairs()]


class Dispatch:
    """Computes and records scores for an objective; `computed_pairs` counts the model's work.

    `attrs(prompt, split)` is what a trial records beside its scores; `timed(phase)` measures.
    """

    def __init__(
        self,
        evaluator: Any,
        lm: LanguageModel,
        store: TrialStore,
        *,
        workers: Any = None,
        attrs: Callable[[Prompt, str], dict[str, Any]],
        timed: Callable[[str], AbstractContextManager[None]],
    ):
        self.evaluator = evaluator
        self.lm = lm
        self.store = store
        self.workers = workers  # None: score here; else pairs go to workers as queued jobs
        self.attrs = attrs
        self.timed = timed
        self.computed_pairs = 0  # pairs actually run through the model (not replayed)

    def compute(self, keyed: Sequence[Keyed], wanted: Callable[[Pair], bool], split: str) -> None:
        """Score the wanted pairs that no store holds, and record them."""
        todo = []
        for r in keyed:
            missing = [
                ex
                for ek, ex in zip(r.example_keys, r.examples, strict=True)
                if wanted((r.key, ek)) and (r.key, ek) not in self.store.scores
            ]
            if missing:
                todo.append((r.prompt, missing))
        if not todo:
            return
        with self.timed("score"):
            if self.workers is not None:
                self._dispatch(todo, split)
            else:
                rows = score_grouped(self.evaluator, self.lm, todo)
                for (prompt, examples), row in zip(todo, rows, strict=True):
                    attrs = self.attrs(prompt, split)
                    self.store.record(prompt, [e.key() for e in examples], row.tolist(), **attrs)
        self.computed_pairs += sum(len(examples) for _, examples in todo)

    def _dispatch(self, todo: list[tuple[Prompt, list[Example]]], split: str) -> None:
        """Queue the pairs no job covers yet, then wait for every job that covers them."""
        pending = self.store.pending
        jobs = set()
        for prompt, examples in todo:
            key = prompt.key()
            jobs |= {pending[(key, e.key())] for e in examples if (key, e.key()) in pending}
            fresh = [e for e in examples if (key, e.key()) not in pending]
            if fresh:
                jobs.add(self.store.submit(prompt, fresh, **self.attrs(prompt, split)))
        self.store.wait(jobs, check=self.workers.check)

    def details(
        self,
        keyed: Sequence[Keyed],
        examples: Sequence[Example],
        charged: Callable[[Pair], bool],
        origin: str,
    ) -> int:
        """Compute and record the evaluator's detail on charged pairs the store lacks (see
        `Objective.evaluate_train`); returns the detail's width. Scored here, not by workers."""
        choice = offers(self.evaluator, LABEL_LOGPROBS)
        stored = self.store.details  # replayed from the study, so a resumed run recomputes none

        def missing(key: str, example: str) -> bool:
            return charged((key, example)) and (key, example) not in stored

        todo = [
            r
            for r in dict((r.key, r) for r in keyed).values()
            if any(missing(r.key, ek) for ek in r.example_keys)
        ]
        if todo:
            asked = [r.prompt for r in todo]
            with self.timed("score"):
                if choice:
                    grid = by_prefix(self.evaluator.label_logprobs, self.lm, asked, examples)
                else:
                    grid = score_prompts(self.evaluator, self.lm, asked, examples)[..., None]
            self.computed_pairs += len(todo) * len(examples)
            gold = _gold_index(self.evaluator, examples) if choice else None
            for r, rows in zip(todo, grid, strict=True):
                fresh = [
                    (ek, detail)
                    for ek, detail in zip(r.example_keys, rows, strict=True)
                    if missing(r.key, ek)
                ]
                self.store.record(
                    r.prompt,
                    [ek for ek, _ in fresh],
                    [float(d.argmax() == gold[ek]) if choice else float(d[0]) for ek, d in fresh],
                    details=[d for _, d in fresh],
                    **{**self.attrs(r.prompt, "train"), "origin": origin},
                )
        return len(self.evaluator.resolve_labels(examples)) if choice else 1


def score_grouped(evaluator: Any, lm: LanguageModel, todo) -> list[np.ndarray]:
    """Scores per (prompt, examples) item; items on the same examples share an evaluator call."""
    groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for i, (_, examples) in enumerate(todo):
        groups[tuple(e.key() for e in examples)].append(i)
    rows: list[np.ndarray] = [np.empty(0)] * len(todo)
    for members in groups.values():
        grid = score_prompts(evaluator, lm, [todo[i][0] for i in members], todo[members[0]][1])
        for i, row in zip(members, grid, strict=True):
            rows[i] = np.asarray(row, dtype=np.float64)
    return rows


def _gold_index(evaluator: Any, examples: Sequence[Example]) -> dict[str, int]:
    """Example key -> index of its label on the last axis of `label_logprobs`."""
    labels = evaluator.resolve_labels(examples)
    index = {label: i for i, label in enumerate(labels)}
    missing = sorted({ex.output for ex in examples} - index.keys())
    if missing:
        raise ValueError(f"example outputs {missing} are not among the labels {labels}")
    return {ex.key(): index[ex.output] for ex in examples}
