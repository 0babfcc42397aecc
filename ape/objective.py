"""The objective: the one door through which searchers score prompts and generate text.

It gives a searcher what every searcher would otherwise repeat, each kept in a room of its own:
the budget (ape/budget.py), scoring here or through workers (ape/dispatch.py), stored generated
text (ape/generation_cache.py), the best-so-far curve (ape/ranking.py) and the trial store that
makes runs resumable (ape/study.py). A searcher only decides what to try next.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ape.budget import Budget, BudgetExhausted, check_counts
from ape.dispatch import Dispatch, Keyed, pairs_of, score_grouped
from ape.generation_cache import StoredGeneration
from ape.lm import LanguageModel
from ape.prompt import Prompt
from ape.ranking import BestSoFar, Candidate
from ape.result import Artifact
from ape.study import TrialStore
from ape.task import Example, Task

__all__ = ["Budget", "BudgetExhausted", "Candidate", "Objective", "score_grouped"]

# Test examples scored and stored together when a result's evidence is computed.
EVIDENCE_CHUNK = 128


class Objective(StoredGeneration):
    """Scores prompts on task examples for a searcher, within a budget, through a trial store.

    `val_order` is one seeded permutation of the validation split shared by every candidate:
    searchers take minibatches from its front, so candidates are compared on the same examples
    and a finished candidate's score is its mean over the first `len(val)` of this order.
    """

    def __init__(
        self,
        task: Task,
        lm: LanguageModel,
        evaluator,
        store: TrialStore,
        *,
        budget: int | None = None,
        seed: int = 0,
        val_examples: int = 100,
        progress: bool = True,
        workers=None,
        length_penalty: float = 0.0,
        budget_bar: bool = True,  # False: only evidence is scored, outside any budget
    ):
        check_counts(val_examples=val_examples)
        budget_bar = budget_bar and progress
        if not task.val:
            raise ValueError(f"task {task.name!r} has no validation examples")
        self.task = task
        self.lm = lm
        self.evaluator = evaluator
        self.store = store
        self.workers = workers  # None: score here; else pairs go to workers as queued jobs
        self.seed = seed
        # Score lost per prompt token when candidates are ranked (see ape.ranking.ranked).
        self.length_penalty = length_penalty
        order = np.random.default_rng(seed).permutation(len(task.val))
        self.val_order: list[Example] = [task.val[i] for i in order]
        self.val_examples = min(val_examples, len(task.val))
        self.candidates: dict[str, Candidate] = {}
        self.seconds: dict[str, float] = defaultdict(float)
        # What a searcher hands to the result beside its prompts (see ape.result.Result)
        self.extras: dict[str, Any] = {}  # JSON-serialisable, e.g. a training curve
        self.artifacts: dict[str, Artifact] = {}  # saved as files next to the result
        self.progress = progress
        self.budget = Budget(budget)
        self.budget.bar = tqdm(
            total=budget, desc="scoring", unit="unit", disable=not budget_bar, dynamic_ncols=True
        )
        self._best = BestSoFar([e.key() for e in self.val_pool])
        self._scoring = Dispatch(
            evaluator, lm, store, workers=workers, attrs=self._attrs, timed=self.timed
        )

    # ----------------------------------------------------------------------- what searchers call
    @property
    def val_pool(self) -> list[Example]:
        """The validation examples every finished candidate is scored on."""
        return self.val_order[: self.val_examples]

    @property
    def history(self) -> list[list[float]]:
        """[budget used, best validation score so far] after each scoring call (see BestSoFar)."""
        return self._best.points

    @property
    def computed_pairs(self) -> int:
        """Pairs actually run through the model (not replayed)."""
        return self._scoring.computed_pairs

    def add_candidates(self, prompts: Sequence[Prompt], origin: str) -> None:
        """Note where prompts came from (shown on the leaderboard) before they are scored."""
        for prompt in prompts:
            self.candidates.setdefault(prompt.key(), Candidate(prompt, origin))

    def evaluate(
        self, prompts: Sequence[Prompt], examples: Sequence[Example], origin: str = ""
    ) -> np.ndarray:
        """Scores of shape (len(prompts), len(examples)); see `evaluate_each`."""
        return np.stack(self.evaluate_each([(p, examples) for p in prompts], origin=origin))

    def evaluate_each(
        self, requests: Sequence[tuple[Prompt, Sequence[Example]]], origin: str = ""
    ) -> list[np.ndarray]:
        """Each prompt's scores on its own examples (train or validation, never test).

        Pairs new to this run cost one budget unit each. When the budget cannot cover all of
        them, the ones that fit (in request order) are scored and recorded, the rest are NaN,
        and `BudgetExhausted` is raised.
        """
        keyed = [Keyed(p, list(exs)) for p, exs in requests]
        exhausted = self.budget.charge_pairs(pairs_of(keyed))
        self.add_candidates([r.prompt for r in keyed], origin)
        self._scoring.compute(keyed, self.budget.charged, split="val")
        scores = self.store.scores
        results = []
        for r in keyed:
            row = np.array(
                [scores.get(p, np.nan) if self.budget.charged(p) else np.nan for p in r.pairs()]
            )
            candidate = self.candidates[r.key]
            for ek, value in zip(r.example_keys, row, strict=True):
                if not np.isnan(value):
                    candidate.val[ek] = float(value)
            results.append(row)
        self._note_best(keyed)
        if exhausted:
            raise self.budget.exhausted()
        return results

    def evaluate_train(
        self, prompts: Sequence[Prompt], examples: Sequence[Example], origin: str = ""
    ) -> np.ndarray:
        """The evaluator's detail for a learning signal, on training examples.

        For a searcher that learns from more than the evaluator's score (the RL policy learns
        from the label margin): with a `choice` evaluator, the label-word log-probs, shape
        (prompts, examples, labels); with any other evaluator, its scores, shape
        (prompts, examples, 1). All prompts go to the model in one call. Budget works as in
        `evaluate_each`; each prompt's scores (accuracy for `choice`) on examples not yet stored
        are recorded as one trial with split "train", together with the detail itself, so a
        resumed run replays them instead of scoring again. They never count as validation scores.
        Pairs past the budget are NaN, then `BudgetExhausted` is raised. Scored here, not by
        workers.
        """
        keyed = [Keyed(p, list(examples)) for p in prompts]
        exhausted = self.budget.charge_pairs(pairs_of(keyed))
        self.add_candidates(prompts, origin)
        width = self._scoring.details(keyed, examples, self.budget.charged, origin)
        stored = self.store.details
        out = np.full((len(keyed), len(examples), width), np.nan)
        for i, r in enumerate(keyed):
            for j, pair in enumerate(r.pairs()):
                if self.budget.charged(pair) and pair in stored:
                    out[i, j] = stored[pair]
        if exhausted:
            raise self.budget.exhausted()
        return out

    def charge(self, units: int) -> None:
        """Spend `units` on compute no trial records (a soft prompt's training step, say).

        Raises `BudgetExhausted`, spending nothing, when the remaining budget cannot cover it.
        """
        self.budget.charge(units)

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Add the wall time of the block to `seconds[phase]` (reported as `<phase>_s`)."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - began

    # ----------------------------------------------------------------------- what optimize() calls
    def score_evidence(self, prompts: Sequence[Prompt], split: str) -> np.ndarray:
        """Scores on the validation pool or the whole test split, outside the budget.

        This is the evidence a result reports (the finalists' test scores, the no-instruction
        reference), not search, so it costs no budget and is never shown to a searcher.
        """
        examples = self.val_pool if split == "val" else self.task.test
        self.add_candidates(prompts, "reference")
        # In chunks, each stored when done: a large test split shows progress, and an interrupted
        # run resumes from the last stored chunk instead of scoring the split again.
        bar = tqdm(
            total=len(prompts) * len(examples),
            desc=f"scoring {split} ({getattr(self.evaluator, 'name', 'score')})",
            unit="pair",
            disable=not self.progress or split == "val",
            dynamic_ncols=True,
        )
        with self.timed("evidence"), bar:
            for start in range(0, len(examples), EVIDENCE_CHUNK):
                chunk = examples[start : start + EVIDENCE_CHUNK]
                keyed = [Keyed(p, chunk) for p in prompts]
                self._scoring.compute(keyed, lambda pair: True, split=split)
                bar.update(len(prompts) * len(chunk))
        rows = []
        for r in (Keyed(p, examples) for p in prompts):
            row = np.array([self.store.scores[pair] for pair in r.pairs()])
            scores = dict(zip(r.example_keys, row.tolist(), strict=True))
            target = self.candidates[r.key]
            if split == "val":
                target.val.update(scores)
            else:
                target.test = scores
            rows.append(row)
        return np.stack(rows) if rows else np.zeros((0, len(examples)))

    def close(self) -> None:
        if self.budget.bar is not None:
            self.budget.bar.close()

    # ----------------------------------------------------------------------- internals
    def _note_best(self, keyed: list[Keyed]) -> None:
        """Extend the history; record each candidate newly complete on the pool as a trial, so
        the study's best trial is the leaderboard's winner."""
        scored = [self.candidates[key] for key in dict.fromkeys(r.key for r in keyed)]
        for candidate, judged in self._best.update(self.budget.used, scored):
            self.store.record_pool(
                candidate.prompt,
                judged.score,
                judged.examples,
                origin=candidate.origin,
                budget_used=self.budget.used,
            )

    def _attrs(self, prompt: Prompt, split: str) -> dict:
        """What a trial records beside its scores."""
        candidate = self.candidates.get(prompt.key())
        return {
            "split": split,
            "origin": candidate.origin if candidate else "",
            "budget_used": self.budget.used,
        }


def score_unranked(
    objective: Objective, prompt: Prompt, examples: Sequence[Example], origin: str = ""
) -> np.ndarray:
    """The evaluator's score of `prompt` on each of `examples`, stored and budgeted as in
    `Objective.evaluate_train` (a resumed run replays it), without making the prompt a
    leaderboard candidate: for a searcher's own test before a prompt may compete (a soft-prompt
    checkpoint held to its start). Scoring it later with `evaluate` costs nothing more."""
    objective.evaluate_train([prompt], examples, origin)
    scores = objective.store.scores
    return np.array([scores.get(p, np.nan) for p in Keyed(prompt, list(examples)).pairs()])
