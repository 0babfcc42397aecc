"""How soft prompts are trained at a few shots without ending below where they started.

- `balanced_batches`: every batch holds as many examples of each label (for classification), so
  no step pushes the prompt toward one label just because the draw had more of it.
- `Checkpoints`: the initial prompt is a candidate from the start. Checkpoints are compared by
  their validation loss (the training loss on the validation pool: a smooth likelihood signal,
  where accuracy over 32 examples moves in steps of 1/32 and ties often), early stopping counts
  checkpoints without a lower loss, and the lowest-loss checkpoint is then held to the initial
  prompt on the evaluator's score, example by example (`paired_gain`): it becomes a candidate
  only if it scores higher on average and either wins on significantly more validation examples
  than it loses (a one-sided sign test) or, for classification, has a validation loss below the
  labels' entropy (`label_entropy`: what no input-blind answer reaches). At 16 shots a
  2-example margin over 32 is noise, and a checkpoint kept on such a margin alone has ended
  below its start on test; the initial prompt stays the result otherwise.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from ape.search.acceptance import paired_gain
from ape.search.soft.prompt import SoftPrompt

from ape.objective import Objective, score_unranked
from ape.prompt import Prompt
from ape.task import Example

ORIGIN_START = "soft: initial prompt"


def balanced_batches(
    examples: Sequence[Example], size: int, rng: np.random.Generator, balance: bool
) -> Iterator[list[Example]]:
    """Endless seeded batches. With `balance`, each holds max(1, round(size / labels)) examples
    of every label (output), each label cycling through its own shuffled examples; else epochs
    over all examples in shuffled order, `size` at a time (an epoch's last may be shorter)."""
    if not balance:
        size = min(size, len(examples))
        while True:
            order = rng.permutation(len(examples)).tolist()
            for i in range(0, len(examples), size):
                yield [examples[j] for j in order[i : i + size]]
    by_label: dict[str, list[Example]] = defaultdict(list)
    for example in examples:
        by_label[example.output].append(example)
    groups = [by_label[label] for label in sorted(by_label)]
    each = max(1, round(size / len(groups)))
    queues: list[list[Example]] = [[] for _ in groups]
    while True:
        batch = []
        for group, queue in zip(groups, queues, strict=True):
            while len(queue) < each:
                queue += [group[j] for j in rng.permutation(len(group))]
            batch += queue[:each]
            del queue[:each]
        yield batch


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """No gradients for the model's own weights (backward then costs about one forward less)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


Loss = Callable[[torch.Tensor, Sequence[Example]], torch.Tensor]


class Checkpoints:
    """The initial prompt, and the checkpoint with the lowest validation loss if it passes
    `paired_gain` against it (at level `alpha`) or, with a higher mean, has a validation loss
    below `chance` (None: no such evidence, e.g. the loss is not a classifier's), as candidates;
    the result's soft prompt (`objective.artifacts["soft_prompt"]`) is the checkpoint if it
    passed, else the start."""

    def __init__(
        self,
        objective: Objective,
        lm: Any,
        info: dict,
        loss: Loss,
        alpha: float,
        chance: float | None = None,
    ):
        self.objective = objective
        self.lm = lm
        self.info = info
        self.loss = loss
        self.alpha = alpha
        self.chance = chance
        self.start: SoftPrompt | None = None
        self.start_row: np.ndarray | None = None  # the start's score on each validation example
        self.picked: SoftPrompt | None = None  # the lowest validation loss so far
        self.picked_loss = float("inf")
        self.stale = 0
        self.curve: list[list[float]] = []  # [step, training loss]
        self.checkpoints: list[dict] = []
        self.extras: dict[str, Any] = {
            "training_curve": self.curve,
            "checkpoints": self.checkpoints,
            **info,
        }
        objective.extras["soft_prompt"] = self.extras

    def begin(self, vectors: torch.Tensor) -> None:
        """The initial prompt: a candidate at once (so a run cut short still has it)."""
        self.start = self.picked = SoftPrompt(vectors, self.lm.name, {**self.info, "step": 0})
        self.start_row = self.score(self.start, ORIGIN_START)
        self.objective.artifacts["soft_prompt"] = self.start
        self.extras.update(start_label=self.start.label, best_step=0, best_label=self.start.label)
        self.checkpoint(0, vectors)

    def checkpoint(self, step: int, vectors: torch.Tensor) -> None:
        """Record the validation loss; keep the vectors if it is the lowest so far."""
        pool = self.objective.val_pool
        self.objective.charge(len(pool))
        with torch.no_grad():
            loss = float(self.loss(vectors, pool))
        soft = self.start if step == 0 else SoftPrompt(vectors, self.lm.name, {**self.info})
        soft.info.update(step=step, val_loss=round(loss, 6))
        self.checkpoints.append({"step": step, "val_loss": round(loss, 6), "label": soft.label})
        if loss < self.picked_loss:
            self.picked, self.picked_loss, self.stale = soft, loss, 0
        else:
            self.stale += 1

    def finish(self) -> None:
        """Hold the picked checkpoint to the initial prompt on the validation examples (and its
        loss to chance); only if it passes does it become a candidate and the artifact. Its
        test pass is stored but unranked (`score_unranked`), so a checkpoint that fails never
        reaches the leaderboard."""
        if self.start is None or self.picked is None or self.picked is self.start:
            self.extras["kept_start"] = True
            return
        step = self.picked.info["step"]
        origin = f"soft step {step}"  # its leaderboard origin, should it pass
        row = score_unranked(self.objective, self.picked.prompt(), self.objective.val_pool, origin)
        below = self.chance is not None and self.picked_loss < self.chance
        gain = paired_gain(row, self.start_row, self.alpha, below_chance=below)
        if self.chance is not None:
            gain.update(val_loss=round(self.picked_loss, 6), chance_loss=round(self.chance, 6))
            gain.update(below_chance=below)
        self.extras["acceptance"] = {"step": step, "val_score": float(np.mean(row)), **gain}
        best = self.start
        if gain["accepted"]:
            self.score(self.picked, origin)
            best = self.picked
        self.objective.artifacts["soft_prompt"] = best
        self.extras.update(kept_start=best is self.start, picked_step=step)
        self.extras.update(best_step=best.info["step"], best_label=best.label)

    def score(self, soft: SoftPrompt, origin: str) -> np.ndarray:
        """Score `soft` on the validation pool as a candidate; its row of per-example scores."""
        row = self.objective.evaluate([soft.prompt()], self.objective.val_pool, origin=origin)[0]
        soft.info["val_score"] = float(np.mean(row))
        return row

    def project(self, vectors_of: Callable[[SoftPrompt], list[int]], start_ids: list[int]) -> None:
        """Score the artifact's nearest tokens as a text instruction (a separate entry), unless
        they are the initial tokens (then that text is the initial prompt already)."""
        soft = self.objective.artifacts.get("soft_prompt")
        if not isinstance(soft, SoftPrompt) or soft.kind != "embeddings":
            return
        ids = vectors_of(soft)
        text = self.lm.tokenizer.decode(ids)
        readable = text.strip().removeprefix("Instruction:").strip()  # as the template renders
        projection = {
            "token_ids": ids,
            "tokens": [self.lm.tokenizer.decode([i]) for i in ids],
            "text": readable,
            "val_score": None,
            "same_as_start": ids == start_ids,
        }
        soft.info["projection"] = projection
        self.extras["projection"] = projection
        if readable and ids != start_ids:
            row = self.objective.evaluate(
                [Prompt(readable).with_label_words(soft.info.get("label_words"))],
                self.objective.val_pool,
                origin="soft: nearest tokens",
            )[0]
            projection["val_score"] = float(np.mean(row))
