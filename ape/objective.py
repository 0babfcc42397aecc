"""The objective: the one door through which searchers score prompts and generate text.

It owns what every searcher would otherwise repeat: the budget (a hard cap), the cache of scored
(prompt, example) pairs and of generated text (replayed from the study, so runs resume), trial
recording, progress bars and timings. A searcher only decides what to try next.

Budget accounting is logical, not physical: a pair the run asks for costs one unit the first time
this run asks for it, whether it was computed now or replayed from storage. So an interrupted and
resumed run spends exactly what an uninterrupted one does and makes the same decisions.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ape.lm import LanguageModel
from ape.prompt import Prompt
from ape.result import Artifact
from ape.soft_prompt import score_prompts
from ape.study import TrialStore, content_hash
from ape.task import Example, Task

# Test examples scored and stored together when a result's evidence is computed.
EVIDENCE_CHUNK = 128


class BudgetExhausted(Exception):
    """The budget cap is reached; what fit under it was scored and recorded."""


@dataclass
class Budget:
    """Scored (prompt, example) pairs plus generated tokens, capped at `limit` (None: no cap)."""

    limit: int | None = None
    pairs: int = 0
    tokens: int = 0

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"budget must be a positive number of units, got {self.limit}")

    @property
    def used(self) -> int:
        return self.pairs + self.tokens

    @property
    def remaining(self) -> float:
        return float("inf") if self.limit is None else self.limit - self.used


@dataclass
class Candidate:
    """Everything the run learned about one prompt."""

    prompt: Prompt
    origin: str
    val: dict[str, float] = field(default_factory=dict)  # example key -> score
    test: dict[str, float] = field(default_factory=dict)

    @property
    def val_score(self) -> float:
        return float(np.mean(list(self.val.values()))) if self.val else float("nan")


class Objective:
    """Scores prompts on task examples for a searcher, within a budget, through a trial store.

    `val_order` is one seeded permutation of the validation split shared by every candidate:
    searchers take minibatches from its front in order, so candidates are compared on the same
    examples (lower-variance comparisons) and a finished candidate's score is its mean over the
    first `len(val)` examples of this order.
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
    ):
        if val_examples <= 0:
            raise ValueError(f"val_examples must be positive, got {val_examples}")
        if not task.val:
            raise ValueError(f"task {task.name!r} has no validation examples")
        self.task = task
        self.lm = lm
        self.evaluator = evaluator
        self.store = store
        self.workers = workers  # None: score here; else pairs go to workers as queued jobs
        self.budget = Budget(budget)
        self.seed = seed
        order = np.random.default_rng(seed).permutation(len(task.val))
        self.val_order: list[Example] = [task.val[i] for i in order]
        self.val_examples = min(val_examples, len(task.val))
        self.candidates: dict[str, Candidate] = {}
        self.seconds: dict[str, float] = defaultdict(float)
        self.computed_pairs = 0  # pairs actually run through the model (not replayed)
        self._charged: set[tuple[str, str]] = set()
        # [budget used, best validation score so far] after each scoring call (see _note_best)
        self.history: list[list[float]] = []
        # What a searcher hands to the result beside its prompts (see ape.result.Result)
        self.extras: dict[str, Any] = {}  # JSON-serialisable, e.g. a training curve
        self.artifacts: dict[str, Artifact] = {}  # saved as files next to the result
        self._pool_keys = [e.key() for e in self.val_pool]
        self._full_best = float("-inf")  # best mean on the whole pool among complete candidates
        self._partial: dict[str, float] = {}  # mean so far of candidates not yet complete
        self._progress = progress
        self._bar = tqdm(
            total=budget, desc="scoring", unit="unit", disable=not progress, dynamic_ncols=True
        )

    # ----------------------------------------------------------------------- what searchers call
    @property
    def val_pool(self) -> list[Example]:
        """The validation examples every finished candidate is scored on."""
        return self.val_order[: self.val_examples]

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
        keyed = [_Keyed(p, list(exs)) for p, exs in requests]
        exhausted = self._charge_pairs(keyed)

        self.add_candidates([r.prompt for r in keyed], origin)
        self._compute(keyed, lambda pair: pair in self._charged, split="val")
        results = []
        for r in keyed:
            row = np.array(
                [
                    self.store.scores.get((r.key, ek), np.nan)
                    if (r.key, ek) in self._charged
                    else np.nan
                    for ek in r.example_keys
                ]
            )
            candidate = self.candidates[r.key]
            for ek, value in zip(r.example_keys, row, strict=True):
                if not np.isnan(value):
                    candidate.val[ek] = float(value)
            results.append(row)
        self._note_best(keyed)
        if exhausted:
            raise BudgetExhausted(f"budget of {self.budget.limit} units reached")
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
        keyed = [_Keyed(p, list(examples)) for p in prompts]
        exhausted = self._charge_pairs(keyed)
        self.add_candidates(prompts, origin)

        choice = hasattr(self.evaluator, "label_logprobs")
        stored = self.store.details  # replayed from the study, so a resumed run recomputes none

        def missing(key: str, example: str) -> bool:
            return (key, example) in self._charged and (key, example) not in stored

        todo = [
            r
            for r in dict((r.key, r) for r in keyed).values()
            if any(missing(r.key, ek) for ek in r.example_keys)
        ]
        if todo:
            asked = [r.prompt for r in todo]
            with self.timed("score"):
                if choice:
                    grid = self.evaluator.label_logprobs(self.lm, asked, examples)
                else:
                    grid = self.evaluator.score(self.lm, asked, examples)[..., None]
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
                    **{**self._attrs(r.prompt, "train"), "origin": origin},
                )
        width = len(self.evaluator.resolve_labels(examples)) if choice else 1
        out = np.full((len(keyed), len(examples), width), np.nan)
        for i, r in enumerate(keyed):
            for j, ek in enumerate(r.example_keys):
                if (r.key, ek) in self._charged and (r.key, ek) in stored:
                    out[i, j] = stored[(r.key, ek)]
        if exhausted:
            raise BudgetExhausted(f"budget of {self.budget.limit} units reached")
        return out

    def generate(
        self,
        prompts: Sequence[str],
        *,
        n: int = 1,
        temperature: float = 0.0,
        max_new_tokens: int = 32,
        seed: int | None = None,
        chat: bool = False,
        stop: Sequence[str] | None = None,
        lm: LanguageModel | None = None,
        desc: str = "generating",
    ) -> list[list[str]]:
        """`n` completions per prompt, replayed from the study when stored.

        Prompts are sampled in fixed chunks of about 32 sequences (efficient CPU decoding). Each
        chunk draws from its own seed, derived from `seed` and the chunk's text, and is stored as
        one unit, so its samples are the same whether the run was interrupted or not. Each prompt
        reserves n * max_new_tokens units and is charged the tokens it produced. Prompts the
        remaining budget cannot reserve are not run: the outputs returned are for a prefix of
        `prompts`, and `BudgetExhausted` is raised after it.
        """
        lm = lm or self.lm
        affordable = len(prompts)
        if self.budget.limit is not None:
            affordable = min(affordable, int(self.budget.remaining // (n * max_new_tokens)))
        size = max(1, 32 // n)
        chunks = [list(prompts[i : min(i + size, affordable)]) for i in range(0, affordable, size)]
        outputs: list[list[str]] = []
        bar = tqdm(total=affordable, desc=desc, unit="prompt", disable=not self._progress)
        for chunk in chunks:
            request = {
                "model": lm.name,
                "prompts": chunk,
                "n": n,
                "temperature": temperature,
                "max_new_tokens": max_new_tokens,
                "seed": seed,
                "chat": chat,
                "stop": list(stop or []),
            }
            stored = self.store.generation(request)
            if stored is None:
                with self.timed("generate"):
                    texts = lm.generate(
                        chunk,
                        n=n,
                        temperature=temperature,
                        max_new_tokens=max_new_tokens,
                        seed=None if seed is None else int(content_hash([seed, chunk], 8), 16),
                        chat=chat,
                        stop=stop,
                    )
                tokens = sum(_token_count(lm, out, max_new_tokens) for out in texts)
                stored = {"texts": texts, "tokens": tokens}
                self.store.record_generation(request, stored)
            self.budget.tokens += stored["tokens"]
            self._bar.update(stored["tokens"])
            outputs += [list(out) for out in stored["texts"]]
            bar.update(len(chunk))
        bar.close()
        if affordable < len(prompts):
            raise BudgetExhausted(f"budget of {self.budget.limit} units reached")
        return outputs

    # ----------------------------------------------------------------------- what optimize() calls
    def score_evidence(self, prompts: Sequence[Prompt], split: str) -> np.ndarray:
        """Scores on the validation pool or the whole test split, outside the budget.

        This is the evidence a result reports (the finalists' test scores, the no-instruction
        reference), not search, so it costs no budget and is never shown to a searcher.
        """
        examples = self.val_pool if split == "val" else self.task.test
        keyed = [_Keyed(p, examples) for p in prompts]
        self.add_candidates(prompts, "reference")
        # In chunks, each stored when done: a large test split shows progress, and an interrupted
        # run resumes from the last stored chunk instead of scoring the split again.
        bar = tqdm(
            total=len(prompts) * len(examples),
            desc=f"scoring {split}",
            unit="pair",
            disable=not self._progress or split == "val",
            dynamic_ncols=True,
        )
        with self.timed("evidence"), bar:
            for start in range(0, len(examples), EVIDENCE_CHUNK):
                chunk = examples[start : start + EVIDENCE_CHUNK]
                self._compute([_Keyed(p, chunk) for p in prompts], lambda pair: True, split=split)
                bar.update(len(prompts) * len(chunk))
        rows = []
        for r in keyed:
            row = np.array([self.store.scores[(r.key, ek)] for ek in r.example_keys])
            scores = dict(zip(r.example_keys, row.tolist(), strict=True))
            target = self.candidates[r.key]
            if split == "val":
                target.val.update(scores)
            else:
                target.test = scores
            rows.append(row)
        return np.stack(rows) if rows else np.zeros((0, len(examples)))

    def _note_best(self, keyed: list[_Keyed]) -> None:
        """Append [budget used, best validation score so far] to `history` (score-vs-budget).

        The score is the best mean on the whole validation pool among candidates scored on all of
        it (how results are ranked, so the curve ends at the result's best validation score);
        before any candidate is complete, the best mean of any candidate over the examples it has
        seen (noisier). Only the candidates this call scored are looked at, so it is cheap; a
        resumed run replays the same calls and so rebuilds the same history.
        """
        pool = set(self._pool_keys)
        for key in dict.fromkeys(r.key for r in keyed):
            val = self.candidates[key].val
            if not val:
                continue
            if pool <= val.keys():
                self._partial.pop(key, None)
                mean = float(np.mean([val[k] for k in self._pool_keys]))
                self._full_best = max(self._full_best, mean)
            else:
                self._partial[key] = float(np.mean(list(val.values())))
        if self._full_best > float("-inf"):
            best = self._full_best
        elif self._partial:
            best = max(self._partial.values())
        else:
            return
        point = [self.budget.used, best]
        if self.history and self.history[-1][0] == point[0]:
            self.history[-1] = point  # nothing spent since: the newer best replaces the point
        elif not self.history or self.history[-1][1] != best:
            self.history.append(point)

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Add the wall time of the block to `seconds[phase]` (reported as `<phase>_s`)."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - began

    def _charge_pairs(self, keyed: list[_Keyed]) -> bool:
        """Charge one unit per pair new to this run, in request order, as far as the budget goes.

        Returns True when some new pairs did not fit (they stay uncharged and unscored).
        """
        new = list(
            dict.fromkeys(
                (r.key, ek)
                for r in keyed
                for ek in r.example_keys
                if (r.key, ek) not in self._charged
            )
        )
        allowed = len(new)
        if self.budget.limit is not None:
            allowed = int(min(allowed, self.budget.remaining))
        self._charged.update(new[:allowed])
        self.budget.pairs += allowed
        self._bar.update(allowed)
        return allowed < len(new)

    def charge(self, units: int) -> None:
        """Spend `units` on compute no trial records (a soft prompt's training step, say).

        Raises `BudgetExhausted`, spending nothing, when the remaining budget cannot cover it.
        """
        if units > self.budget.remaining:
            raise BudgetExhausted(f"budget of {self.budget.limit} units reached")
        self.budget.pairs += units
        self._bar.update(units)

    def close(self) -> None:
        self._bar.close()

    # ----------------------------------------------------------------------- internals
    def _compute(self, keyed: list[_Keyed], wanted, split: str) -> None:
        """Score wanted pairs that no store holds: here, or through workers when there are some."""
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
                for (prompt, examples), row in zip(
                    todo, score_grouped(self.evaluator, self.lm, todo), strict=True
                ):
                    attrs = self._attrs(prompt, split)
                    self.store.record(prompt, [e.key() for e in examples], row.tolist(), **attrs)
        self.computed_pairs += sum(len(examples) for _, examples in todo)

    def _dispatch(self, todo: list[tuple[Prompt, list[Example]]], split: str) -> None:
        """Queue the pairs no job covers yet, then wait for every job that covers them."""
        jobs = set()
        for prompt, examples in todo:
            key = prompt.key()
            queued = {
                self.store.pending[(key, e.key())]
                for e in examples
                if (key, e.key()) in self.store.pending
            }
            fresh = [e for e in examples if (key, e.key()) not in self.store.pending]
            jobs |= queued
            if fresh:
                jobs.add(self.store.submit(prompt, fresh, **self._attrs(prompt, split)))
        self.store.wait(jobs, check=self.workers.check)

    def _attrs(self, prompt: Prompt, split: str) -> dict:
        """What a trial records beside its scores."""
        candidate = self.candidates.get(prompt.key())
        return {
            "split": split,
            "origin": candidate.origin if candidate else "",
            "budget_used": self.budget.used,
        }


def score_grouped(evaluator, lm: LanguageModel, todo) -> list[np.ndarray]:
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


def _gold_index(evaluator, examples: Sequence[Example]) -> dict[str, int]:
    """Example key -> index of its label on the last axis of `label_logprobs`."""
    labels = evaluator.resolve_labels(examples)
    index = {label: i for i, label in enumerate(labels)}
    missing = sorted({ex.output for ex in examples} - index.keys())
    if missing:
        raise ValueError(f"example outputs {missing} are not among the labels {labels}")
    return {ex.key(): index[ex.output] for ex in examples}


@dataclass
class _Keyed:
    """A prompt and its examples, with the content keys the store is indexed by."""

    prompt: Prompt
    examples: list[Example]
    key: str = ""
    example_keys: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.key = self.prompt.key()
        self.example_keys = [e.key() for e in self.examples]


def _token_count(lm: LanguageModel, texts: Sequence[str], max_new_tokens: int) -> int:
    """Tokens produced; without a tokenizer, the reserved maximum is charged (an upper bound)."""
    tokenizer = getattr(lm, "tokenizer", None)
    if tokenizer is None:
        return len(texts) * max_new_tokens
    counts = [len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    return sum(min(c, max_new_tokens) for c in counts)
