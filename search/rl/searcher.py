"""RL prompts (after RLPrompt, Deng et al. 2022): a trained policy writes short discrete prompts.

The policy (policy.py) is a frozen LM with a small trainable MLP on its last hidden
state, read back through the LM head; it writes `prompt_length` tokens with top-k sampling. Each
step it samples `prompts_per_step` prompts, and the task model scores all of them on a minibatch
of training examples in one call to the shared batched scorer (through the objective, which
charges the budget and records every sampled prompt as a trial):

- classification (`choice` evaluator): the reward is the label-word margin, p(gold) minus the
  largest p(other label), scaled (reward.py);
- other tasks (`loglik`, `loglik_sum`): the log-likelihood of the reference output, per token
  for `loglik`.

Which of the two is the evaluator's declared capability (``label_logprobs`` or
``loglik_scores``, ape/capabilities.py); any other evaluator is refused before the model loads.

Rewards are averaged over the minibatch and z-scored across the step's prompts. Training is
REINFORCE with the step mean as baseline (that is what the z-scoring subtracts) plus an entropy
bonus under the same top-k distribution the tokens were sampled from.

Training uses the training split; candidates are chosen on the validation pool: the
`finalists` prompts with the best mean training reward, plus the final policy's greedy prompt,
are scored on `objective.val_pool`, and `optimize()` tests the best of those. The policy's
weights go into `objective.artifacts["policy"]` (saved beside the result) and the reward per
step into `objective.extras["training_curve"]`.

Why policy gradient and not soft Q-learning (RLPrompt's choice). Measured on this project's machine
(SmolLM2-135M as task and policy model, 16-shot sets, 2 CPU cores): a step of 8 prompts x 8
examples is 64 scored pairs, 2.2 s on SST-2 and 4.3 s on AG News when idle (15-30 s when the
machine was shared with other jobs), so a run that must end within 15 minutes gets some dozens of
steps, a few hundred sampled prompts, where RLPrompt trains for thousands of SQL steps. In that
regime the on-policy estimator with an explicit per-step baseline is the simpler and safer choice;
what mattered was keeping it from collapsing too early: with Adam at lr 1e-4 and entropy weight
0.01 the policy collapsed onto one prompt within ~8 steps (top-k entropy 3.3 -> 0.08 nats by step
9), while lr 3e-5 with entropy weight 0.05 kept it exploring for 30 steps (3.3 -> 1.5 nats). Soft
Q-learning (a target network, per-token bootstrapped values) was not implemented or measured here;
its advantages (off-policy reuse, token-level credit) pay off over far longer runs than the CPU
budget allows.

Why 72 steps. On SST-2 (test accuracy on a fixed 200-row test sample, seeds 0/1/2, 2026-11-25):
24 steps gave 0.665/0.640/0.555, the same 24 steps with `learning_rate=0` (no training: selection
among the untrained policy's samples only) 0.650/0.640/0.540, and 72 steps 0.665/0.670/0.620.
So at 24 steps the gain over random prompts was selection, not learning; by 72 steps the policy
has converged (entropy near 0) on prompts that also hold up on test, and each SST-2 run took
100-150 s on the idle machine. Once the policy has converged its prompts repeat, and repeated
(prompt, example) pairs cost no budget, so the budget used grows less than the step count.
benchmarks/rl/README.md has the held-out comparison on sets that were not used for this choice.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from ape.search.base import non_negative, option, positive
from ape.search.rl.policy import PromptPolicy, Rollout
from ape.search.rl.reward import label_margin, zscore

from ape.capabilities import LABEL_LOGPROBS, LOGLIK_SCORES, check, offers
from ape.lm import LanguageModel
from ape.objective import Objective
from ape.prompt import Prompt


@dataclass(frozen=True)
class RLSearcher:
    name: ClassVar[str] = "rl"
    # The reward: the label-word margin, or else the reference's log-likelihood.
    needs: ClassVar[frozenset[str]] = frozenset({LABEL_LOGPROBS, LOGLIK_SCORES})

    steps: int = option(72, "training steps (with a budget: at most this many, fewer if it binds)")
    prompts_per_step: int = option(8, "prompts sampled per step, scored together")
    prompt_length: int = option(5, "L: tokens per prompt")
    minibatch: int = option(8, "training examples each step's prompts are scored on")
    token_top_k: int = option(256, "the policy samples each token from its k most likely")
    hidden: int = option(2048, "width of the policy's MLP")
    learning_rate: float = option(
        3e-5, "Adam learning rate of the MLP (0: no training, an ablation that only selects)"
    )
    entropy: float = option(0.05, "weight of the entropy bonus")
    reward_correct: float = option(180.0, "scale of the label margin when the prediction is right")
    reward_incorrect: float = option(200.0, "scale of the label margin when it is wrong")
    finalists: int = option(
        4, "best sampled prompts (by training reward) scored on the validation pool, plus greedy"
    )
    context: str = option("Instruction:", "text the policy continues when writing a prompt")
    policy_model: str | None = option(
        None, "model under the policy (default: the model being optimized, loaded once)"
    )

    def __post_init__(self) -> None:
        positive(
            steps=self.steps,
            prompts_per_step=self.prompts_per_step,
            prompt_length=self.prompt_length,
            minibatch=self.minibatch,
            token_top_k=self.token_top_k,
            hidden=self.hidden,
            finalists=self.finalists,
            reward_correct=self.reward_correct,
            reward_incorrect=self.reward_incorrect,
        )
        non_negative(learning_rate=self.learning_rate, entropy=self.entropy)

    # ----------------------------------------------------------------------------- the search
    def search(self, objective: Objective) -> None:
        check(self, objective.evaluator)
        choice = offers(objective.evaluator, LABEL_LOGPROBS)
        train = list(objective.task.train)
        if not train:
            raise ValueError(
                f"searcher 'rl' trains on the training split; {objective.task.name!r} has none"
            )
        policy = PromptPolicy(
            self._policy_lm(objective),
            hidden=self.hidden,
            context=self.context,
            top_k=self.token_top_k,
            seed=objective.seed,
        )
        objective.artifacts["policy"] = policy
        curve: list[dict[str, Any]] = []
        objective.extras["training_curve"] = curve
        optimizer = torch.optim.Adam(policy.mlp.parameters(), lr=self.learning_rate)
        generator = torch.Generator().manual_seed(objective.seed)
        batches = _minibatches(train, self.minibatch, objective.seed, balanced=choice)
        # prompt text -> [sum of rewards, examples seen]: picks the finalists
        seen: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        gold = _gold(objective, train) if choice else None

        began = time.perf_counter()
        for step in range(self._steps(objective, len(train))):
            rollout = policy.sample(self.prompts_per_step, self.prompt_length, generator)
            texts = policy.texts(rollout.tokens)
            per_example, accuracy = self._rewards(objective, texts, next(batches), gold)
            rewards = per_example.mean(-1)
            for text, row in zip(texts, per_example, strict=True):
                seen[text][0] += float(row.sum())
                seen[text][1] += len(row)
            loss, entropy = self._update(policy, optimizer, rollout, zscore(rewards))
            curve.append(
                {
                    "step": step + 1,
                    "reward": float(rewards.mean()),
                    "reward_max": float(rewards.max()),
                    "accuracy": accuracy,
                    "entropy": entropy,
                    "loss": loss,
                    "budget_used": objective.budget.used,
                    "seconds": round(time.perf_counter() - began, 2),
                    "prompts": texts,
                    "rewards": [float(r) for r in rewards],
                }
            )

        greedy = policy.texts(policy.sample(1, self.prompt_length, None, greedy=True).tokens)
        best = sorted(seen, key=lambda t: -seen[t][0] / seen[t][1])[: self.finalists]
        finalists = list(dict.fromkeys(best + greedy))
        objective.evaluate([Prompt(t) for t in finalists], objective.val_pool, origin="rl")

    def _rewards(
        self, objective: Objective, texts: list[str], examples: list, gold: dict[str, int] | None
    ) -> tuple[np.ndarray, float]:
        """Per (prompt, example) rewards on a training minibatch, and the accuracy (NaN
        without labels): the label margin from label log-probs, else the scores themselves."""
        detail = objective.evaluate_train([Prompt(t) for t in texts], examples, origin="rl")
        if gold is None:
            return detail[..., 0], float("nan")
        index = np.array([gold[e.key()] for e in examples])
        margin = label_margin(detail, index, self.reward_correct, self.reward_incorrect)
        return margin, float((detail.argmax(-1) == index).mean())

    # ----------------------------------------------------------------------------- helpers
    def _update(
        self, policy: PromptPolicy, optimizer, rollout: Rollout, advantages: np.ndarray
    ) -> tuple[float, float]:
        """One REINFORCE step with an entropy bonus; returns (loss, mean entropy)."""
        logp, entropy = policy.log_probs(rollout)
        weights = torch.as_tensor(advantages, dtype=logp.dtype, device=logp.device)
        loss = -(weights * logp.sum(-1)).mean() - self.entropy * entropy.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss.detach()), float(entropy.detach().mean())

    def _policy_lm(self, objective: Objective) -> LanguageModel:
        if self.policy_model is None or self.policy_model == objective.lm.name:
            return objective.lm
        from ape.models import load_model

        # The policy's hidden states feed its MLP next to the task model: same device.
        return load_model(self.policy_model, device=getattr(objective.lm, "device", None))

    def _steps(self, objective: Objective, n_train: int) -> int:
        """The configured steps, or fewer when a budget must also cover the finalists."""
        if objective.budget.limit is None:
            return self.steps
        per_step = self.prompts_per_step * min(self.minibatch, n_train)
        final = (self.finalists + 1) * len(objective.val_pool)
        spare = objective.budget.remaining - final
        return int(min(self.steps, max(0, spare // per_step)))

    @classmethod
    def test_options(cls) -> dict[str, object]:
        """Small options for the conformance tests: three steps of a narrow policy, seconds on
        the tiny test model."""
        return dict(
            steps=3, prompts_per_step=4, minibatch=4, hidden=16, token_top_k=20, finalists=2
        )


def _minibatches(train: list, size: int, seed: int, balanced: bool):
    """Endless seeded minibatches of the training examples.

    With `balanced` (classification), each holds the labels in equal shares as far as `size`
    allows: otherwise a model that always answers one label scores the share of that label in
    the batch, and that noise swamps the reward curve.
    """
    rng = np.random.default_rng(seed)
    size = min(size, len(train))
    if not balanced:
        while True:
            order = rng.permutation(len(train))
            for start in range(0, len(order) - size + 1, size):
                yield [train[i] for i in order[start : start + size]]
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, example in enumerate(train):
        by_label[example.output].append(i)
    labels = sorted(by_label)
    queues: dict[str, list[int]] = {label: [] for label in labels}
    offset = 0  # which labels get the extra slots when `size` is not a multiple of them
    while True:
        batch: list[int] = []
        for k in range(size):
            label = labels[(offset + k) % len(labels)]
            if not queues[label]:
                queues[label] = list(rng.permutation(by_label[label]))
            batch.append(int(queues[label].pop()))
        offset += size
        yield [train[i] for i in rng.permutation(batch)]


def _gold(objective: Objective, examples: list) -> dict[str, int]:
    """Example key -> index of its label in the evaluator's label order."""
    labels = objective.evaluator.resolve_labels(examples)
    index = {label: i for i, label in enumerate(labels)}
    return {e.key(): index[e.output] for e in examples}
