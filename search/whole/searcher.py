"""The whole prompt: instruction, demonstrations and their number and order, searched together.

1. Baselines first: no instruction, each human instruction (the task's, or `--instruction`), and
   the `demos` baseline's same-seed random demos are scored on the whole validation pool, so the
   winner can never be a prompt one of them beats there.
2. Pools: APE's proposal step writes instructions; `num_demo_sets` seeded demo sets of
   `max_demos` training examples are drawn (class-balanced for labelled tasks). A label's demo
   shows the word the evaluator scores (a verbalizer), not the raw label.
3. Candidates pair them: each demo set without instruction, and each instruction (proposed or
   human) with a demo set in turn. A UCB bandit (search/bandit.py) spends scoring on the
   promising ones, every pull on validation examples the candidate has not seen.
4. Resampling around the best (APE's loop, widened to demos): for the `top_k` candidates, the LM
   rephrases the instruction (same demos), the demo set mutates (one demo swapped for one of the
   same class, order shuffled, one fewer, one more), and the best instruction is tried with each
   top demo set. The bandit continues over old and new.
5. The `finalists` best by mean (minus `--length-penalty` per prompt token; ties: the shorter) are
   scored on the whole pool beside the baselines; `optimize()` ranks on those full-pool scores.

With `--label-words search` (the `choice` evaluator), the label words are a third axis: after the
baselines, search/label_words.py chooses words for the best baseline's prompt, and the best two
assignments that pass its acceptance test join the task's own words as word sets. Candidates
take word sets in turn (each demo set without instruction takes each), and resampling also moves
the top candidates to the other word sets. A prompt with searched words shows its demos with them.

With `--max-demos 0` it is instruction-only APE with the baselines in the pool. Candidates whose
prompt would not fit the model's window with the longest validation example are skipped, with a
note on stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from ape.search.bandit import Arm, UCBBandit, stage_rounds
from ape.search.base import non_negative, option, positive
from ape.search.demos import DemoSet, draw_sets, label_words, mutations, random_demos, shown
from ape.search.label_words import (
    LABEL_WORDS_HELP,
    LabelWordsMode,
    WordSearch,
    search_label_words,
    word_search_cost,
)
from ape.search.proposal import (
    PROPOSALS_HELP,
    SUBSAMPLES_HELP,
    ProposalOptions,
    chat_flags,
    proposal_origin,
    resample_prompt,
    sample_ahead,
    sample_instructions,
)

from ape.objective import Objective
from ape.prompt import Prompt
from ape.prompt_length import prompt_tokens


@dataclass(frozen=True)
class WholePromptSearcher(ProposalOptions):
    name: ClassVar[str] = "whole"

    num_subsamples: int = option(2, SUBSAMPLES_HELP)
    num_proposals: int = option(4, PROPOSALS_HELP)
    instructions: tuple[str, ...] = option(
        (),
        "baseline instructions (CLI: --instruction, repeatable); default: the task's human "
        "instructions from meta.json",
        flag="--instruction",
    )
    random_demos: int = option(5, "demos in the random-demos baseline (the `demos` searcher's k)")
    max_demos: int = option(8, "most demos a prompt shows; 0: instruction-only APE")
    num_demo_sets: int = option(6, "seeded demo sets drawn from the training split")
    minibatch: int = option(10, "validation examples per bandit pull")
    per_round: int = option(8, "candidates pulled per bandit round")
    rounds: int = option(
        4, "bandit rounds per stage; with a budget, the rounds are sized to fill it instead"
    )
    c: float = option(1.0, "UCB exploration weight, in standard deviations of the scores")
    resample_rounds: int = option(1, "rounds of resampling around the best")
    top_k: int = option(3, "candidates resampled around per round")
    variations: int = option(2, "rephrasings asked per resampled instruction and template")
    finalists: int = option(3, "best candidates scored on the whole validation pool")
    label_words: LabelWordsMode = option("given", LABEL_WORDS_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(
            minibatch=self.minibatch,
            per_round=self.per_round,
            top_k=self.top_k,
            variations=self.variations,
            finalists=self.finalists,
            num_demo_sets=self.num_demo_sets,
        )
        non_negative(
            rounds=self.rounds,
            resample_rounds=self.resample_rounds,
            c=self.c,
            max_demos=self.max_demos,
            random_demos=self.random_demos,
        )

    # ----------------------------------------------------------------------------- the search
    def check_task(self, task) -> None:
        """One line, before the model loads, when the training split cannot give the demos."""
        if self.max_demos > len(task.train):
            raise ValueError(
                f"task {task.name!r}: max_demos={self.max_demos}, but the training split has "
                f"{len(task.train)} rows; pass --max-demos {len(task.train)} or fewer"
            )

    def search(self, objective: Objective) -> None:
        train = objective.task.train
        self.check_task(objective.task)
        pool = _Pool(objective, self.minibatch, self.c, objective.length_penalty)
        pool.add(self._baselines(objective), full=True)
        pool.word_sets = self._word_sets(objective, pool)

        proposer = self.proposer(objective)
        chats = chat_flags(self.templates, proposer)
        humans = self._human(objective)
        sets = draw_sets(train, self.num_demo_sets, self.max_demos, objective.seed)
        if self.max_demos:
            pool.add([(pool.prompt("", s, w), s, "demo set") for s in sets for w in pool.word_sets])
        for origin, found in self.propose(objective, proposer):
            pool.add(self._paired(pool, found, sets, origin))
        pool.add(self._paired(pool, humans, sets, "human"))

        rounds = self._rounds(objective, pool, len(chats))
        pool.bandit.run(rounds, self.per_round)
        rng = np.random.default_rng([objective.seed, 3])
        for r in range(1, self.resample_rounds + 1):
            top = pool.top(self.top_k)
            sets = [(self._rephrase_prompts(top, chat), chat) for chat in chats]
            sample_ahead(
                objective, proposer, sets, desc="resampling, all templates", **self._sampling()
            )
            for chat in chats:
                pool.add(self._rephrased(objective, proposer, pool, top, chat, r))
            pool.add(self._mutated(pool, top, train, rng, r))
            pool.add(self._reworded(pool, top, r))
            pool.bandit.run(rounds, self.per_round)
        objective.evaluate([arm.prompt for arm in pool.top(self.finalists)], objective.val_pool)

    @classmethod
    def test_options(cls) -> dict[str, object]:
        """Small options for the conformance tests: seconds on the tiny test model."""
        return dict(
            num_subsamples=1,
            num_proposals=2,
            max_demos=3,
            num_demo_sets=2,
            minibatch=3,
            per_round=3,
            rounds=2,
            resample_rounds=1,
            top_k=2,
            variations=1,
            finalists=2,
            max_new_tokens=8,
        )

    def schedule(self, task, pool: int, templates: int) -> dict[str, int]:
        """What the default schedule spends at most (no budget): scored pairs and generated
        tokens, for a validation pool of `pool` examples and `templates` proposal templates."""
        humans = len(self.instructions) or len(task.human_instructions)
        baselines = (1 + humans + (1 if self.random_demos else 0)) * pool
        stages = (
            (self.resample_rounds + 1) * self.rounds * self.per_round * min(self.minibatch, pool)
        )
        samples = templates * (
            self.num_subsamples * self.num_proposals
            + self.resample_rounds * self.top_k * self.variations
        )
        words = word_search_cost(task, pool) if self.label_words == "search" else {}
        return {
            "pairs": baselines + stages + self.finalists * pool + words.get("pairs", 0),
            "tokens": samples * self.max_new_tokens + words.get("tokens", 0),
        }

    # ----------------------------------------------------------------------------- candidates
    def _human(self, objective: Objective) -> list[str]:
        return list(self.instructions) or list(objective.task.human_instructions)

    def _baselines(self, objective: Objective) -> list[tuple[Prompt, DemoSet, str]]:
        """No instruction, each human instruction, and the `demos` baseline's random demos."""
        out = [(Prompt(""), (), "baseline: no instruction")]
        out += [(Prompt(t), (), "baseline: human") for t in self._human(objective)]
        train = objective.task.train
        if self.random_demos and len(train) >= self.random_demos:
            demos = random_demos(train, self.random_demos, objective.seed)
            label = f"baseline: {self.random_demos} random demos"
            out.append((Prompt("", shown(demos, label_words(objective))), demos, label))
        return out

    def _word_sets(self, objective: Objective, pool: _Pool) -> list[dict[str, str]]:
        """The task's words ({}: the evaluator's own) and, with label-word search, the two best
        assignments searched for the best baseline's prompt that passed acceptance."""
        if self.label_words != "search":
            return [{}]
        best = pool.top(1)
        template = Prompt(best[0].prompt.instruction, pool.demos_of(best[0])) if best else Prompt()
        found = search_label_words(objective, template, WordSearch())
        given = pool.words
        searched = [a.mapping for a in found if a.mapping != given][:2]
        text, demos = template.instruction, template.demos
        pool.add([(pool.prompt(text, demos, w), demos, "label words") for w in searched])
        return [{}, *searched]

    def _paired(self, pool: _Pool, texts: Sequence[str], sets: list[DemoSet], origin: str):
        """Each instruction with a demo set and a word set in turn (without demos when
        max_demos is 0)."""
        out = []
        for i, text in enumerate(texts):
            demos = sets[i % len(sets)] if self.max_demos else ()
            words = pool.word_sets[i % len(pool.word_sets)]
            out.append((pool.prompt(text, demos, words), demos, origin))
        return out

    def _rephrased(self, objective, proposer, pool: _Pool, top: list[Arm], chat: bool, r: int):
        """LM variations of the top candidates' instructions, each with its candidate's demos."""
        parents = [arm for arm in top if arm.prompt.instruction]
        if not parents:
            return []
        prompts = self._rephrase_prompts(top, chat)
        texts = sample_instructions(
            objective,
            proposer,
            prompts,
            chat=chat,
            max_chars=self.max_chars,
            desc="resampling",
            **self._sampling(),
        )
        origin = proposal_origin(objective, proposer, chat, f"resample {r}")
        out = []
        for i, text in enumerate(texts):
            parent = parents[i // self.variations]
            if text is not None:
                demos = pool.demos_of(parent)
                out.append((pool.prompt(text, demos, parent.prompt.words), demos, origin))
        return out

    @staticmethod
    def _rephrase_prompts(top: list[Arm], chat: bool) -> list[str]:
        """The resampling prompts for the top candidates that have an instruction."""
        return [
            resample_prompt(arm.prompt.instruction, chat=chat)
            for arm in top
            if arm.prompt.instruction
        ]

    def _sampling(self) -> dict[str, object]:
        """How variations are sampled: per parent, `variations` of them."""
        return dict(
            n=self.variations, temperature=self.temperature, max_new_tokens=self.max_new_tokens
        )

    def _mutated(self, pool: _Pool, top: list[Arm], train, rng, r: int):
        """Demo-set neighbours of the top candidates, and the best instruction on their demos."""
        out = []
        for arm in top:
            words = arm.prompt.words
            for demos in mutations(pool.demos_of(arm), train, self.max_demos, rng):
                out.append((pool.prompt(arm.prompt.instruction, demos, words), demos, f"demos {r}"))
        best = next((arm.prompt.instruction for arm in top if arm.prompt.instruction), "")
        if best:
            for arm in top:
                demos = pool.demos_of(arm)
                out.append((pool.prompt(best, demos, arm.prompt.words), demos, f"crossover {r}"))
        return out

    def _reworded(self, pool: _Pool, top: list[Arm], r: int):
        """The top candidates with each other word set (none without label-word search)."""
        out = []
        for arm in top:
            demos = pool.demos_of(arm)
            for words in pool.word_sets:
                if words != arm.prompt.words:
                    out.append(
                        (pool.prompt(arm.prompt.instruction, demos, words), demos, f"words {r}")
                    )
        return out

    def _rounds(self, objective: Objective, pool: _Pool, templates: int) -> int:
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


class _Pool:
    """The bandit's candidates with their raw demo sets, window check and ranking rule."""

    def __init__(self, objective: Objective, minibatch: int, c: float, length_penalty: float):
        self.objective = objective
        self.bandit = UCBBandit(objective, minibatch, c)
        self.length_penalty = length_penalty
        self.words = label_words(objective)
        self.word_sets: list[dict[str, str]] = [{}]  # {}: the evaluator's own words
        self.raw: dict[str, DemoSet] = {}  # prompt key -> demos before label words are shown
        self.tokens: dict[str, int] = {}
        self.window = getattr(objective.lm, "max_length", None)
        self.longest = _longest_example(objective)
        self.skipped = 0

    def show(self, demos: DemoSet) -> DemoSet:
        return shown(demos, self.words)

    def prompt(self, instruction: str, demos: DemoSet, words: dict[str, str]) -> Prompt:
        """The candidate: with label words of its own, its demos keep their labels (the prompt
        shows them with its words); else they show the evaluator's words."""
        if words:
            return Prompt(instruction, demos, label_words=tuple(words.items()))
        return Prompt(instruction, self.show(demos))

    def demos_of(self, arm: Arm) -> DemoSet:
        return self.raw.get(arm.prompt.key(), ())

    def add(self, items: list[tuple[Prompt, DemoSet, str]], full: bool = False) -> None:
        """Add candidates (skipping any that would not fit the window); `full`: score them on
        the whole validation pool now."""
        by_origin: dict[str, list[Prompt]] = {}
        for prompt, demos, origin in items:
            key = prompt.key()
            if key in self.bandit.arms or not self._fits(prompt):
                continue
            self.raw[key] = demos
            by_origin.setdefault(origin, []).append(prompt)
        for origin, prompts in by_origin.items():
            if full:
                self.objective.add_candidates(prompts, origin)
                try:
                    self.objective.evaluate(prompts, self.objective.val_pool)
                finally:
                    self.bandit.add(prompts, origin)
                    self.bandit.absorb(list(self.bandit.arms.values()))
            else:
                self.bandit.add(prompts, origin)

    def _fits(self, prompt: Prompt) -> bool:
        key = prompt.key()
        self.tokens[key] = prompt_tokens(self.objective.lm, prompt)
        if self.window is None or self.tokens[key] + self.longest <= self.window:
            return True
        self.skipped += 1
        print(
            f"note: skipped a candidate of {self.tokens[key]} prompt tokens: with the longest "
            f"validation example ({self.longest} tokens) it exceeds the model's window "
            f"({self.window})",
            file=sys.stderr,
        )
        return False

    def rank_key(self, arm: Arm) -> tuple[float, int]:
        tokens = self.tokens.get(arm.prompt.key(), 0)
        return (-(arm.mean - self.length_penalty * tokens), tokens)

    def top(self, k: int) -> list[Arm]:
        """The k pulled arms with the best penalized mean (ties: the shorter prompt)."""
        pulled = [a for a in self.bandit.arms.values() if a.scores]
        return sorted(pulled, key=self.rank_key)[:k]


def _longest_example(objective: Objective) -> int:
    """Tokens of the longest validation input plus output, with the template around them."""
    tokenizer = getattr(objective.lm, "tokenizer", None)
    texts = [Prompt().context(e.input) + Prompt.continuation(e.output) for e in objective.val_pool]
    if tokenizer is None or not texts:
        return max((len(t.split()) for t in texts), default=0)
    return max(len(tokenizer(t).input_ids) for t in texts)
