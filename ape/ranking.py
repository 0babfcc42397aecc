"""How candidates are judged: one rule, used by the leaderboard, the score-vs-budget history and
the study's best trial.

The rule: a candidate scored on the whole validation pool is judged on exactly that pool, so all
such candidates are compared on the same examples, and it outranks any candidate scored on fewer
examples (a mean over fewer examples is noisier). A candidate not yet complete is judged on all it
has seen. Among equals, the sort is stable: ties go to the candidate the run found first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ape.prompt import Prompt


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


class Standing(NamedTuple):
    """Where a candidate stands: whether it covers the pool, on how many examples, what mean."""

    complete: bool
    examples: int
    score: float


def judge(candidate: Candidate, pool: Sequence[str] | None = None) -> Standing:
    """The candidate's standing against the validation `pool` (example keys)."""
    if pool and all(k in candidate.val for k in pool):
        return Standing(True, len(pool), float(np.mean([candidate.val[k] for k in pool])))
    return Standing(False, len(candidate.val), candidate.val_score)


def standing(candidate: Candidate, pool: Sequence[str] | None = None) -> tuple[int, float]:
    """(validation examples, mean score) a candidate is ranked by (see `judge`)."""
    judged = judge(candidate, pool)
    return judged.examples, judged.score


def ranked(
    candidates: list[Candidate],
    pool: Sequence[str] | None = None,
    tokens: Mapping[str, int] | None = None,
    length_penalty: float = 0.0,
) -> list[Candidate]:
    """Candidates best first: those scored on the most validation examples lead, by mean score.

    With `tokens` (prompt key -> the prompt's tokens), the mean is lowered by `length_penalty`
    per token (CAPO-style) and ties go to the shorter prompt: it costs the user less per call.
    """
    tokens = tokens or {}

    def key(c: Candidate) -> tuple[float, float, int]:
        examples, score = standing(c, pool)
        length = tokens.get(c.prompt.key(), 0)
        return (-examples, -(score - length_penalty * length), length)

    return sorted((c for c in candidates if c.val), key=key)


class BestSoFar:
    """The score-vs-budget curve: [budget used, best validation score so far] points.

    The score is the best pool mean among complete candidates (how results are ranked, so the
    curve ends at the result's best validation score); before any candidate is complete, the best
    mean of any candidate over the examples it has seen (noisier). Only the candidates a call
    scored are looked at, so it is cheap; a resumed run replays the same calls and so rebuilds
    the same curve.
    """

    def __init__(self, pool: Sequence[str]):
        self.pool = list(pool)
        self.points: list[list[float]] = []
        self.complete_best = float("-inf")
        self._partial: dict[str, float] = {}  # mean so far of candidates not yet complete

    def update(
        self, used: int, candidates: Iterable[Candidate]
    ) -> list[tuple[Candidate, Standing]]:
        """Take in the candidates a call scored; returns those of them complete on the pool."""
        complete = []
        for candidate in candidates:
            if not candidate.val:
                continue
            judged = judge(candidate, self.pool)
            key = candidate.prompt.key()
            if judged.complete:
                self._partial.pop(key, None)
                self.complete_best = max(self.complete_best, judged.score)
                complete.append((candidate, judged))
            else:
                self._partial[key] = judged.score
        self._add_point(used)
        return complete

    def _add_point(self, used: int) -> None:
        if self.complete_best > float("-inf"):
            best = self.complete_best
        elif self._partial:
            best = max(self._partial.values())
        else:
            return
        point = [used, best]
        if self.points and self.points[-1][0] == used:
            self.points[-1] = point  # nothing spent since: the newer best replaces the point
        elif not self.points or self.points[-1][1] != best:
            self.points.append(point)
