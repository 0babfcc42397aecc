"""APE (Zhou et al. 2022, "Large Language Models Are Human-Level Prompt Engineers").

1. Proposal: for each of S subsamples of D training demos, the proposal model writes P
   instructions with APE's forward template ("... The instruction was to"), and, for chat models,
   with the same question as a chat turn. Samples are cleaned to one sentence and de-duplicated.
2. Evaluation: a UCB bandit (search/bandit.py) spends scoring on the promising candidates, each
   pull on validation examples the candidate has not seen.
3. Resampling: for R rounds, the top-k instructions are each rephrased (APE's "variation that keeps
   the semantic meaning"), and the bandit continues over old and new candidates.
4. The finalists are scored on the whole validation pool, and the best of them is the result.

With `--label-words search` (the `choice` evaluator), the label words are searched once up front
for the no-instruction prompt (search/label_words.py) and every candidate answers with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ape.search.bandit import UCBBandit, stage_rounds
from ape.search.base import non_negative, option, positive
from ape.search.label_words import LABEL_WORDS_HELP, LabelWordsMode, searched_words
from ape.search.proposal import (
    ProposalOptions,
    chat_flags,
    proposal_origin,
    resample_prompt,
    sample_ahead,
    sample_instructions,
    unique,
)

from ape.objective import Objective
from ape.prompt import Prompt


@dataclass(frozen=True)
class APESearcher(ProposalOptions):
    name: ClassVar[str] = "ape"

    minibatch: int = option(5, "validation examples per bandit pull")
    per_round: int = option(10, "candidates pulled per bandit round")
    rounds: int = option(
        12,
        "bandit rounds after proposal and after each resampling round; with a budget, the "
        "rounds are sized to fill it instead",
    )
    c: float = option(1.0, "UCB exploration weight, in standard deviations of the scores")
    resample_rounds: int = option(1, "R: rounds of asking for variations of the best")
    top_k: int = option(5, "instructions rephrased per resampling round")
    variations: int = option(3, "variations asked per rephrased instruction and template")
    finalists: int = option(5, "best candidates scored on the whole validation pool at the end")
    label_words: LabelWordsMode = option("given", LABEL_WORDS_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(
            minibatch=self.minibatch,
            per_round=self.per_round,
            top_k=self.top_k,
            variations=self.variations,
            finalists=self.finalists,
        )
        non_negative(rounds=self.rounds, resample_rounds=self.resample_rounds, c=self.c)

    # ----------------------------------------------------------------------------- the search
    def search(self, objective: Objective) -> None:
        proposer = self.proposer(objective)
        chats = chat_flags(self.templates, proposer)
        bandit = UCBBandit(objective, self.minibatch, self.c)
        words = tuple(searched_words(objective, self.label_words).items())  # () : the task's

        for origin, found in self.propose(objective, proposer):  # one step per template
            bandit.add([Prompt(t, label_words=words) for t in found], origin)

        rounds = self._rounds(objective, len(chats))
        bandit.run(rounds, self.per_round)
        for r in range(1, self.resample_rounds + 1):
            best = [arm.prompt.instruction for arm in bandit.top(self.top_k)]
            sets = [([resample_prompt(text, chat=chat) for text in best], chat) for chat in chats]
            sample_ahead(
                objective,
                proposer,
                sets,
                n=self.variations,
                temperature=self.temperature,
                max_new_tokens=self.max_new_tokens,
                desc="resampling, all templates",
            )
            for prompts, chat in sets:
                texts = self._sample(objective, proposer, prompts, self.variations, chat, r)
                seen = [arm.prompt.instruction for arm in bandit.arms.values()]
                origin = proposal_origin(objective, proposer, chat, f"resample {r}")
                bandit.add([Prompt(t, label_words=words) for t in unique(texts, seen)], origin)
            bandit.run(rounds, self.per_round)

        finalists = [arm.prompt for arm in bandit.top(self.finalists)]
        objective.evaluate(finalists, objective.val_pool)

    # ----------------------------------------------------------------------------- helpers
    def _sample(self, objective, proposer, prompts, n: int, chat: bool, stage: int) -> list:
        return sample_instructions(
            objective,
            proposer,
            prompts,
            n=n,
            chat=chat,
            temperature=self.temperature,
            max_new_tokens=self.max_new_tokens,
            max_chars=self.max_chars,
            desc="proposing" if stage == 0 else "resampling",
        )

    def _rounds(self, objective: Objective, templates: int) -> int:
        """Bandit rounds per stage: the configured number, or sized to fill a given budget."""
        return stage_rounds(
            objective,
            rounds=self.rounds,
            per_round=self.per_round,
            minibatch=self.minibatch,
            finalists=self.finalists,
            stages=self.resample_rounds + 1,
            resample_tokens=self.resample_rounds
            * self.top_k
            * self.variations
            * self.max_new_tokens
            * templates,
        )

    @classmethod
    def test_options(cls) -> dict[str, object]:
        """Small options for the conformance tests: two short bandit stages over a handful of
        proposals, seconds on the tiny test model."""
        return dict(
            num_subsamples=2,
            num_proposals=3,
            rounds=2,
            resample_rounds=1,
            top_k=2,
            variations=2,
            finalists=2,
            max_new_tokens=8,
        )
