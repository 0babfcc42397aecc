"""Soft prompts: n vectors before the input, trained by gradient while the model stays frozen
(prompt tuning, Lester et al. 2021), or kept on tokens (PEZ, Wen et al. 2023).

1. The vectors start from a text's embeddings, from frequent tokens, or from noise
   (init.py).
2. AdamW trains them on the training split with the evaluator's training loss (capability
   ``training_loss``: cross-entropy over the label words for `choice`, the reference's NLL per
   token for `loglik`), taken through `HFLanguageModel.loglikelihood_tensor`: the scorer's own
   prefix-reusing path, gradients on.
   Each training example costs one budget unit (`Objective.charge`).
3. Every `eval_every` steps (and at step 0) the vectors are a checkpoint: a `SoftPrompt` scored on
   the validation pool through `Objective.evaluate`, so it is a trial like any text candidate and
   is ranked with them. Training stops early after `patience` checkpoints without a better
   validation score; the best checkpoint (the first to reach the best score, as the leaderboard
   ranks ties) goes into `objective.artifacts["soft_prompt"]`.
4. The best vectors are projected to their nearest tokens (cosine); that text is scored as an
   ordinary instruction, a separate leaderboard entry anyone can copy.

With `mode="pez"`, each forward pass and gradient is taken at the vectors' nearest tokens while
the continuous vectors are what AdamW updates (a straight-through estimator), so every
checkpoint is a sequence of real tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from ape.search.base import non_negative, option, positive
from ape.search.soft.init import INITS, embedding_table, initial_vectors
from ape.search.soft.prompt import SoftPrompt, nearest_tokens

from ape.capabilities import LABEL_LOGPROBS, TRAINING_LOSS, check, offers
from ape.objective import Objective
from ape.prompt import Prompt

MODES = ("continuous", "pez")
DEFAULT_INIT_TEXT = "Read the input and give the right output."


@dataclass(frozen=True)
class SoftPromptSearcher:
    name: ClassVar[str] = "soft"
    # Trains through the evaluator's loss; its checkpoints are scored after their vectors.
    needs: ClassVar[frozenset[str]] = frozenset({TRAINING_LOSS})

    n_tokens: int = option(16, "virtual tokens: trained vectors placed before the input")
    init: str = option(
        "text",
        "starting vectors: 'text' (the embeddings of --init-text, tiled or trimmed to n), "
        "'vocab' (random tokens among the 5,000 lowest BPE ids, a stand-in for the most "
        "frequent) or 'random' (Gaussian at the embedding table's scale)",
    )
    init_text: str = option(
        "",
        "text for init 'text' (default: the task's first human instruction; else, with the "
        "choice evaluator, 'Answer with one word: W1, W2 or W3.' naming the label words; else "
        f"{DEFAULT_INIT_TEXT!r})",
    )
    mode: str = option(
        "continuous",
        "'continuous' (prompt tuning) or 'pez' (forward and gradient at the nearest tokens, so "
        "the prompt stays a token sequence)",
    )
    lr: float = option(0.01, "AdamW learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay (pulls the vectors toward zero)")
    steps: int = option(30, "training steps at most")
    batch_size: int = option(8, "training examples per step")
    eval_every: int = option(10, "steps between checkpoints scored on the validation pool")
    patience: int = option(3, "stop after this many checkpoints without a better validation score")

    def __post_init__(self) -> None:
        positive(
            n_tokens=self.n_tokens,
            lr=self.lr,
            steps=self.steps,
            batch_size=self.batch_size,
            eval_every=self.eval_every,
            patience=self.patience,
        )
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, not {self.init!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        non_negative(weight_decay=self.weight_decay)

    def search(self, objective: Objective) -> None:
        lm = objective.lm
        check(self, objective.evaluator)
        _check_setup(objective)
        task = objective.task
        template = Prompt("")  # the text after the vectors: the no-instruction template
        loss_fn = objective.evaluator.training_loss(lm, template, task.train + objective.val_pool)
        generator = torch.Generator().manual_seed(objective.seed)
        text = self.init_text or _default_text(objective)
        start, start_ids = initial_vectors(lm, self.init, self.n_tokens, text, generator)
        vectors = torch.nn.Parameter(start.to(lm.device, lm.model.dtype))
        optimizer = torch.optim.AdamW([vectors], lr=self.lr, weight_decay=self.weight_decay)
        table = embedding_table(lm).to(lm.device, lm.model.dtype) if self.mode == "pez" else None
        run = _Run(objective, lm, self._info(text, start_ids))
        batches = _batches(len(task.train), self.batch_size, np.random.default_rng(objective.seed))
        with _frozen(lm.model):
            run.checkpoint(0, self._used(vectors, table, lm).detach())
            for step in range(1, self.steps + 1):
                batch = [task.train[i] for i in next(batches)]
                objective.charge(len(batch))
                loss = loss_fn(self._used(vectors, table, lm), batch)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                run.curve.append([step, round(loss.item(), 6)])
                if step % self.eval_every == 0 or step == self.steps:
                    run.checkpoint(step, self._used(vectors, table, lm).detach())
                    if run.stale >= self.patience:
                        break
        run.project()

    def _used(self, vectors: torch.Tensor, table: torch.Tensor | None, lm) -> torch.Tensor:
        """What the model sees: the vectors, or (PEZ) their nearest tokens' embeddings with the
        gradient passed straight through to the vectors."""
        if table is None:
            return vectors
        tokens = table[nearest_tokens(vectors, lm)]
        return tokens + (vectors - vectors.detach())  # the value is exactly the tokens

    def _info(self, text: str, start_ids: list[int]) -> dict:
        return {
            "init": self.init,
            "init_text": text if self.init == "text" else "",
            "init_tokens": start_ids,
            "mode": self.mode,
            "lr": self.lr,
            "batch_size": self.batch_size,
        }

    @classmethod
    def test_options(cls) -> dict[str, object]:
        """Small options for the conformance tests: four steps, two checkpoints, under a second
        on the tiny test model."""
        return dict(n_tokens=4, init="random", steps=4, batch_size=4, eval_every=2)


class _Run:
    """Checkpoints as trials, the best one as the artifact, the curves as extras."""

    def __init__(self, objective: Objective, lm, info: dict):
        self.objective = objective
        self.lm = lm
        self.info = info
        self.best: SoftPrompt | None = None
        self.best_score = float("-inf")
        self.stale = 0
        self.curve: list[list[float]] = []  # [step, training loss]
        self.checkpoints: list[dict] = []
        self.extras = {
            "training_curve": self.curve,
            "checkpoints": self.checkpoints,
            **info,
        }
        objective.extras["soft_prompt"] = self.extras

    def checkpoint(self, step: int, vectors: torch.Tensor) -> None:
        """Score the vectors on the validation pool (a trial); keep them if they are the best."""
        soft = SoftPrompt(vectors, self.lm.name, {**self.info, "step": step})
        row = self.objective.evaluate(
            [soft.prompt()], self.objective.val_pool, origin=f"soft step {step}"
        )[0]
        score = float(np.mean(row))
        soft.info["val_score"] = score
        self.checkpoints.append({"step": step, "val_score": score, "label": soft.label})
        if score > self.best_score:
            self.best, self.best_score, self.stale = soft, score, 0
            self.objective.artifacts["soft_prompt"] = soft
            self.extras["best_step"] = step
            self.extras["best_label"] = soft.label
        else:
            self.stale += 1

    def project(self) -> None:
        """Score the best vectors' nearest tokens as a text instruction (a separate entry)."""
        if self.best is None:
            return
        ids = self.best.nearest_tokens(self.lm)
        text = self.lm.tokenizer.decode(ids)
        projection = {
            "token_ids": ids,
            "tokens": [self.lm.tokenizer.decode([i]) for i in ids],
            "text": text,
            "val_score": None,
        }
        self.best.info["projection"] = projection
        self.extras["projection"] = projection
        if text.strip():
            row = self.objective.evaluate(
                [Prompt(text.strip())], self.objective.val_pool, origin="soft: nearest tokens"
            )[0]
            projection["val_score"] = float(np.mean(row))


def _default_text(objective: Objective) -> str:
    """The task's own instruction, else the label words (class-label init, as in Lester et al.),
    else a generic instruction."""
    if objective.task.human_instructions:
        return objective.task.human_instructions[0]
    evaluator = objective.evaluator
    if offers(evaluator, LABEL_LOGPROBS):
        _, words = evaluator.label_words(objective.task.train + objective.val_pool)
        listed = ", ".join(words[:-1]) + f" or {words[-1]}" if len(words) > 1 else words[0]
        return f"Answer with one word: {listed}."
    return DEFAULT_INIT_TEXT


def _check_setup(objective: Objective) -> None:
    if not hasattr(objective.lm, "loglikelihood_tensor"):
        raise ValueError("searcher 'soft' trains through a Hugging Face model (HFLanguageModel)")
    if objective.workers is not None:
        raise ValueError("searcher 'soft' scores its vectors in this process; run without workers")
    if not objective.task.train:
        raise ValueError(f"task {objective.task.name!r} has no training examples to train on")


def _batches(n: int, size: int, rng: np.random.Generator) -> Iterator[list[int]]:
    """Endless seeded epochs over n examples, `size` at a time (the last of an epoch may be
    shorter)."""
    size = min(size, n)
    while True:
        order = rng.permutation(n).tolist()
        for i in range(0, n, size):
            yield order[i : i + size]


@contextlib.contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """No gradients for the model's own weights (backward then costs about one forward less)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
