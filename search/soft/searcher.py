"""Soft prompts: vectors before the input, trained by gradient while the model stays frozen.

Modes (`--mode`):
- `continuous`: prompt tuning (Lester et al. 2021): n input-embedding vectors.
- `pez`: each forward pass and gradient is taken at the vectors' nearest tokens while the
  continuous vectors are what AdamW updates (a straight-through estimator, Wen et al. 2023), so
  every checkpoint is a sequence of real tokens.
- `prefix`: prefix tuning / P-tuning v2 (Li & Liang 2021; Liu et al. 2022): per layer n keys and
  values, shaped for the model's KV heads (GQA), fed to the scorer's KV-prefix path; optionally
  reparameterized through an MLP while training (`--encoder mlp`), keeping only the key/values.
- `ptuning`: P-tuning (Liu et al. 2021): an MLP or bidirectional-LSTM prompt encoder writes the
  n input-embedding vectors; trained end to end, its output is what is kept.

1. The vectors start from a text (by default the task's instruction, as the template renders
   it, so step 0 scores exactly as that text prompt), frequent tokens, or noise (init.py); a
   key/value prefix starts as the model's own keys and values for them.
2. AdamW trains on label-balanced batches of the training split with the evaluator's training
   loss (capability ``training_loss``), taken through `HFLanguageModel.loglikelihood_tensor`:
   the scorer's own prefix-reusing path, gradients on. Each training example costs one unit.
3. Selection (training.py): the initial prompt is a candidate; checkpoints every `eval_every`
   steps are compared by validation loss with early stopping; the lowest-loss one becomes a
   second candidate only if it beats the initial prompt on average and either on significantly
   more validation examples than it loses (`accept_p`) or, for classification, with a
   validation loss below the labels' entropy (`below_chance`). The winner goes into
   `objective.artifacts["soft_prompt"]`.
   With `--label-words search` (the `choice` evaluator) the label words are chosen first, for
   the starting text (search/label_words.py); training, checkpoints and the saved soft prompt
   (`info["label_words"]`) use them. The words are ranked on train alone (val judges the start).
4. Embedding vectors are projected to their nearest tokens (cosine); that text, if it is not the
   initial one, is scored as an ordinary instruction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from ape.search.acceptance import ACCEPT_P, check_level, label_entropy
from ape.search.base import non_negative, option, positive
from ape.search.label_words import LABEL_WORDS_HELP, LabelWordsMode, WordSearch, searched_words
from ape.search.soft.encoders import Direct, PrefixMLP, PromptEncoder, ScaledKV
from ape.search.soft.init import INITS, embedding_table, initial_kv, initial_vectors
from ape.search.soft.prompt import nearest_tokens
from ape.search.soft.training import Checkpoints, balanced_batches, frozen

from ape.budget import BudgetExhausted
from ape.capabilities import LABEL_LOGPROBS, TRAINING_LOSS, check, offers
from ape.kv_cache import kv_shape
from ape.objective import Objective
from ape.prompt import Prompt

MODES = ("continuous", "pez", "prefix", "ptuning")
# Per mode, the encoders it takes: "" (not given) stands for the one after it.
ENCODERS = {
    "continuous": ("", "none"),
    "pez": ("", "none"),
    "prefix": ("", "none", "mlp"),
    "ptuning": ("", "mlp", "lstm"),
}
DEFAULT_INIT_TEXT = "Read the input and give the right output."
# Per mode, AdamW's learning rate when --lr is not given (chosen on SST-2; prefix lowered from
# 0.05, whose validation loss rose again after 10-20 steps on 4 of the 5 shared sets).
DEFAULT_LR = {"continuous": 0.01, "pez": 0.01, "prefix": 0.02, "ptuning": 0.001}
TRAIN_RANKED = WordSearch(select_on="train")  # searched label words (see search())


@dataclass(frozen=True)
class SoftPromptSearcher:
    name: ClassVar[str] = "soft"
    # Trains through the evaluator's loss; its checkpoints are scored after their vectors.
    needs: ClassVar[frozenset[str]] = frozenset({TRAINING_LOSS})

    mode: str = option(
        "continuous",
        "'continuous' (prompt tuning), 'pez' (forward and gradient at the nearest tokens, so "
        "the prompt stays a token sequence), 'prefix' (prefix tuning: trained keys and values "
        "at every layer) or 'ptuning' (a prompt encoder writes the vectors)",
    )
    n_tokens: int = option(
        0,
        "virtual tokens; 0: as many as the init text takes as an instruction (16 for init "
        "'vocab' or 'random'); more or fewer tile or trim the text's tokens",
    )
    init: str = option(
        "text",
        "starting vectors: 'text' (the tokens of --init-text as the template renders an "
        "instruction, so step 0 scores as that text prompt), 'vocab' (random tokens among the "
        "5,000 lowest BPE ids, a stand-in for the most frequent) or 'random' (Gaussian at the "
        "embedding table's scale)",
    )
    init_text: str = option(
        "",
        "text for init 'text' (default: the task's first human instruction; else, with the "
        "choice evaluator, 'Answer with one word: W1, W2 or W3.' naming the label words; else "
        f"{DEFAULT_INIT_TEXT!r})",
    )
    encoder: str = option(
        "",
        "what writes the vectors while training: 'none' (they are the parameters), 'mlp' (mode "
        "prefix: Li & Liang's MLP from n smaller vectors to every layer's keys and values; mode "
        "ptuning: P-tuning's MLP encoder) or 'lstm' (ptuning: a bidirectional LSTM and an MLP "
        "head); only its output is kept (default: 'mlp' for ptuning, 'none' otherwise)",
    )
    encoder_hidden: int = option(256, "hidden size of the prompt encoder or the prefix MLP")
    lr: float | None = option(
        None,
        "AdamW learning rate (default per mode: continuous and pez 0.01, prefix 0.02 in units "
        "of each layer's key and value spread, ptuning 0.001)",
    )
    weight_decay: float = option(0.0, "AdamW weight decay (pulls the parameters toward zero)")
    steps: int = option(30, "training steps at most")
    batch_size: int = option(
        8, "training examples per step (for classification, as many of each label)"
    )
    eval_every: int = option(10, "steps between checkpoints compared by validation loss")
    patience: int = option(3, "stop after this many checkpoints without a lower validation loss")
    label_words: LabelWordsMode = option("given", LABEL_WORDS_HELP)
    accept_p: float = option(
        ACCEPT_P,
        "the best checkpoint replaces the initial prompt only if it scores higher on average "
        "and either higher on significantly more validation examples than lower (one-sided "
        "sign test at this level; 1: a higher mean suffices) or passes --below-chance",
    )
    below_chance: bool = option(
        True,
        "classification: a checkpoint with a higher validation mean is also accepted when its "
        "validation cross-entropy is below the labels' entropy (log K for K balanced labels), "
        "which no answer that ignores the input reaches",
    )

    def __post_init__(self) -> None:
        positive(
            steps=self.steps,
            batch_size=self.batch_size,
            eval_every=self.eval_every,
            patience=self.patience,
            encoder_hidden=self.encoder_hidden,
            lr=1.0 if self.lr is None else self.lr,
        )
        non_negative(weight_decay=self.weight_decay, n_tokens=self.n_tokens)
        check_level("accept_p", self.accept_p)
        for name, value, allowed in [
            ("init", self.init, INITS),
            ("mode", self.mode, MODES),
            (f"encoder for mode {self.mode!r}", self.encoder, ENCODERS.get(self.mode, ())),
        ]:
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")

    @property
    def encoder_used(self) -> str:
        """The encoder in effect: the one given, else the mode's first ('mlp' for ptuning)."""
        return self.encoder or ENCODERS[self.mode][1]

    def search(self, objective: Objective) -> None:
        lm = objective.lm
        check(self, objective.evaluator)
        _check_setup(objective, self.mode)
        task = objective.task
        text = self.init_text or _default_text(objective)
        # Words chosen for the text the vectors start from: step 0 scores as that text prompt.
        # Ranked on train alone: the checkpoints are held to this start on val, so val should
        # not also have ranked its words (it still screens them against the given ones).
        words = searched_words(
            objective, self.label_words, Prompt(text if self.init == "text" else ""), TRAIN_RANKED
        )
        template = Prompt("").with_label_words(words)
        loss_fn = objective.evaluator.training_loss(lm, template, task.train + objective.val_pool)
        generator = torch.Generator().manual_seed(objective.seed)
        start, start_ids = initial_vectors(lm, self.init, self.n_tokens, text, generator)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(objective.seed)  # the encoders' initial weights
            params = self._parameters(lm, start).to(lm.device, lm.model.dtype)
        lr = DEFAULT_LR[self.mode] if self.lr is None else self.lr
        optimizer = torch.optim.AdamW(params.parameters(), lr=lr, weight_decay=self.weight_decay)
        table = embedding_table(lm).to(lm.device, lm.model.dtype) if self.mode == "pez" else None
        info = self._info(text, start_ids, lr) | ({"label_words": words} if words else {})
        balance = offers(objective.evaluator, LABEL_LOGPROBS)  # classification: labels known
        use_chance = balance and self.below_chance
        chance = label_entropy([ex.output for ex in objective.val_pool]) if use_chance else None
        run = Checkpoints(objective, lm, info, loss_fn, self.accept_p, chance)
        rng = np.random.default_rng(objective.seed)
        batches = balanced_batches(task.train, self.batch_size, rng, balance)

        def used() -> torch.Tensor:
            return self._used(params(), table, lm)

        with frozen(lm.model):
            try:
                run.begin(used().detach())
                for step in range(1, self.steps + 1):
                    batch = next(batches)
                    objective.charge(len(batch))
                    loss = loss_fn(used(), batch)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    run.curve.append([step, round(loss.item(), 6)])
                    if step % self.eval_every == 0 or step == self.steps:
                        run.checkpoint(step, used().detach())
                        if run.stale >= self.patience:
                            break
            except BudgetExhausted:
                run.finish()  # what was trained so far still competes, if the budget allows
                raise
        run.finish()
        run.project(lambda soft: soft.nearest_tokens(lm), start_ids)

    def _parameters(self, lm, start: torch.Tensor) -> torch.nn.Module:
        """The trained module for the mode, starting at `start` ([n, d_model] embeddings)."""
        if self.mode == "ptuning":
            return PromptEncoder(start, self.encoder_used, self.encoder_hidden)
        if self.mode != "prefix":
            return Direct(start)
        kv = initial_kv(lm, start)
        mlp = self.encoder_used == "mlp"
        return PrefixMLP(kv, start, self.encoder_hidden) if mlp else ScaledKV(kv)

    def _used(self, vectors: torch.Tensor, table: torch.Tensor | None, lm) -> torch.Tensor:
        """What the model sees: the vectors, or (PEZ) their nearest tokens' embeddings with the
        gradient passed straight through to the vectors."""
        if table is None:
            return vectors
        tokens = table[nearest_tokens(vectors, lm)]
        return tokens + (vectors - vectors.detach())  # the value is exactly the tokens

    def _info(self, text: str, start_ids: list[int], lr: float) -> dict:
        info = {
            "init": self.init,
            "init_text": text if self.init == "text" else "",
            "init_tokens": start_ids,
            "mode": self.mode,
            "lr": lr,
            "batch_size": self.batch_size,
        }
        info.update(encoder=self.encoder_used)
        if self.encoder_used != "none":
            info.update(encoder_hidden=self.encoder_hidden)
        return info

    @classmethod
    def test_options(cls) -> dict[str, object]:
        """Small options for the conformance tests: four steps, two checkpoints, under a second
        on the tiny test model."""
        return dict(n_tokens=4, init="random", steps=4, batch_size=4, eval_every=2)


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


def _check_setup(objective: Objective, mode: str) -> None:
    if not hasattr(objective.lm, "loglikelihood_tensor"):
        raise ValueError("searcher 'soft' trains through a Hugging Face model (HFLanguageModel)")
    if objective.workers is not None:
        raise ValueError("searcher 'soft' scores its vectors in this process; run without workers")
    if not objective.task.train:
        raise ValueError(f"task {objective.task.name!r} has no training examples to train on")
    if mode == "prefix":
        try:
            kv_shape(objective.lm.model)
        except ValueError as err:
            raise ValueError(f"--mode prefix: {err}") from None
