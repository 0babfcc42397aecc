"""TPE over (instruction, demo set, number of demos), after MIPROv2 (Opsahl-Ong et al. 2024).

1. Proposal: APE's proposal step (`search.proposal.propose`, the same one the APE searcher runs)
   writes a pool of instructions.
2. Demo sets: `num_demo_sets` subsets of `max_demos` training examples each, drawn with the
   run's seed (each set without repeats; sets may overlap).
3. Trials: Optuna's TPE sampler, seeded with the run's seed, picks per trial an instruction, a
   demo set and how many of its demos to show (0..max_demos). The prompt is scored on its next
   `minibatch` examples of the validation order every candidate shares, so a prompt chosen again
   sees fresh examples, and TPE is told the prompt's mean over all the examples it has seen (for
   a new prompt, the minibatch mean). A prompt that has seen the whole split is not scored again;
   TPE is told its mean.
4. Every `full_eval_every` trials, the prompt with the best mean among those not yet fully
   evaluated (and with at least one full minibatch seen) is scored on the whole validation pool.
5. At the end, the `finalists` prompts with the best means are scored on the whole pool.

Learning from MIPROv2's known weak points:

- The seed is respected: the TPE sampler, the demo sets and the proposals all derive from the
  run's seed, and scoring is deterministic, so the same seed gives the same result.
- The final pick is made on full-evaluation scores, not on averaged minibatch scores. A mean over
  a few small minibatches is noisy and favours lucky prompts; here the best candidates are scored
  on the whole validation pool, and `optimize()` ranks prompts scored on all of it above any
  scored on part, by their full-pool mean.

With `--label-words search` (the `choice` evaluator), the label words are searched once up front
for the no-instruction prompt (search/label_words.py) and every trial's prompt answers with them.

Without a budget the search runs `trials` trials. With one, trials continue until only the
finalists' full evaluation (`finalists` x the pool) is left to pay for, so searchers compared at
equal budget spend it alike, or until `trials` trials in a row had nothing new to score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import optuna
from ape.search.base import non_negative, option, positive
from ape.search.label_words import LABEL_WORDS_HELP, LabelWordsMode, searched_words
from ape.search.proposal import PROPOSALS_HELP, SUBSAMPLES_HELP, ProposalOptions

from ape.objective import Objective
from ape.prompt import Prompt


@dataclass(frozen=True)
class TPESearcher(ProposalOptions):
    name: ClassVar[str] = "tpe"

    # A smaller pool than APE's: TPE spends its budget on (instruction, demos) combinations.
    num_subsamples: int = option(3, SUBSAMPLES_HELP)
    num_proposals: int = option(4, PROPOSALS_HELP)
    num_demo_sets: int = option(6, "demo sets drawn from the training split for TPE to choose")
    max_demos: int = option(4, "demos per set; TPE shows the first 0..max_demos of a set")
    trials: int = option(
        40,
        "TPE trials; with a budget, trials continue until only the finalists' full evaluation "
        "is left to pay for, or until this many trials in a row found nothing new to score",
    )
    minibatch: int = option(10, "validation examples a trial scores its prompt on")
    full_eval_every: int = option(
        10, "trials between full evaluations of the best prompt not yet fully evaluated"
    )
    finalists: int = option(3, "best prompts scored on the whole validation pool at the end")
    n_startup_trials: int = option(10, "random trials before TPE starts modelling")
    label_words: LabelWordsMode = option("given", LABEL_WORDS_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(
            num_demo_sets=self.num_demo_sets,
            trials=self.trials,
            minibatch=self.minibatch,
            full_eval_every=self.full_eval_every,
            finalists=self.finalists,
        )
        non_negative(max_demos=self.max_demos, n_startup_trials=self.n_startup_trials)

    # ----------------------------------------------------------------------------- the search
    def search(self, objective: Objective) -> None:
        words = tuple(searched_words(objective, self.label_words).items())  # () : the task's
        steps = self.propose(objective, self.proposer(objective))
        instructions = [(text, origin) for origin, found in steps for text in found]

        # The demo sets draw from a stream of their own, apart from the proposal subsamples.
        rng = np.random.default_rng([objective.seed, 1])
        train = objective.task.train
        size = min(self.max_demos, len(train))
        demo_sets = [
            tuple(train[i] for i in rng.choice(len(train), size, replace=False))
            for _ in range(self.num_demo_sets)
        ]

        sampler = optuna.samplers.TPESampler(
            seed=objective.seed, n_startup_trials=self.n_startup_trials
        )
        study = optuna.create_study(direction="maximize", sampler=sampler)  # in memory, ours
        tried = _Tried(objective, self.minibatch)
        budget = objective.budget
        reserve = self.finalists * len(objective.val_pool)  # the finalists' full evaluation
        done = idle = 0
        while self._another_trial(objective, done, idle, reserve):
            trial = study.ask()
            i = trial.suggest_categorical("instruction", list(range(len(instructions))))
            d = trial.suggest_categorical("demo_set", list(range(self.num_demo_sets)))
            k = trial.suggest_int("num_demos", 0, size)
            text, origin = instructions[i]
            prompt = Prompt(text, demos=demo_sets[d][:k], label_words=words)
            spent = budget.pairs
            origin += f" + {k} demo{'s' if k > 1 else ''}" if k else ""
            study.tell(trial, tried.pull(prompt, origin))
            idle = idle + 1 if budget.pairs == spent else 0
            done += 1
            if done % self.full_eval_every == 0:
                best = tried.best_unfinished()
                if best is not None and (
                    budget.limit is None or budget.remaining >= tried.missing(best) + reserve
                ):
                    objective.evaluate([best], objective.val_pool)

        finalists = tried.top(self.finalists)
        objective.evaluate(finalists, objective.val_pool)

    def _another_trial(self, objective: Objective, done: int, idle: int, reserve: int) -> bool:
        """Without a budget: until `trials` are done. With one: while it pays for a minibatch
        and the finalists' full evaluation (always at least one trial), and until `trials`
        trials in a row have found nothing new to score."""
        budget = objective.budget
        if budget.limit is None:
            return done < self.trials
        affordable = budget.remaining >= self.minibatch + reserve
        return idle < self.trials and (affordable or done == 0)

    @classmethod
    def test_options(cls) -> dict[str, object]:
        """Small options for the conformance tests: a dozen trials, seconds on the tiny test
        model."""
        return dict(
            num_subsamples=2,
            num_proposals=3,
            max_new_tokens=8,
            num_demo_sets=3,
            max_demos=2,
            trials=12,
            minibatch=5,
            full_eval_every=4,
            finalists=2,
            n_startup_trials=4,
        )


class _Tried:
    """The prompts the trials chose, each scored on a prefix of the shared validation order."""

    def __init__(self, objective: Objective, minibatch: int):
        self.objective = objective
        self.minibatch = minibatch
        self.prompts: dict[str, Prompt] = {}  # in the order first tried

    def seen(self, prompt: Prompt) -> list[float]:
        """The prompt's scores on the longest prefix of the validation order it was scored on."""
        known = self.objective.candidates.get(prompt.key())
        if known is None:
            return []
        scores: list[float] = []
        for example in self.objective.val_order:
            score = known.val.get(example.key())
            if score is None:
                break
            scores.append(score)
        return scores

    def mean(self, prompt: Prompt) -> float:
        scores = self.seen(prompt)
        return float(np.mean(scores)) if scores else float("-inf")

    def missing(self, prompt: Prompt) -> int:
        """Validation-pool examples the prompt has not been scored on."""
        return max(0, len(self.objective.val_pool) - len(self.seen(prompt)))

    def pull(self, prompt: Prompt, origin: str) -> float:
        """Score the prompt on its next minibatch (if any examples are left); its mean so far."""
        self.objective.add_candidates([prompt], origin)
        self.prompts.setdefault(prompt.key(), prompt)
        start = len(self.seen(prompt))
        order = self.objective.val_order
        if start < len(order):
            self.objective.evaluate_each([(prompt, order[start : start + self.minibatch])])
        return self.mean(prompt)

    def best_unfinished(self) -> Prompt | None:
        """The best prompt by mean that has seen a full minibatch but not the whole pool."""
        enough = min(self.minibatch, len(self.objective.val_order))
        open_ = [
            p for p in self.prompts.values() if len(self.seen(p)) >= enough and self.missing(p) > 0
        ]
        return max(open_, key=self.mean, default=None)  # ties: the first tried

    def top(self, k: int) -> list[Prompt]:
        """The k tried prompts with the best means (ties: the first tried)."""
        return sorted(self.prompts.values(), key=lambda p: -self.mean(p))[:k]
