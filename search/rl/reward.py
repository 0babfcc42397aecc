"""Rewards for the RL prompt policy: the label-word margin, and z-scoring across prompts."""

from __future__ import annotations

import numpy as np


def label_margin(
    logprobs: np.ndarray, gold: np.ndarray, correct: float = 180.0, incorrect: float = 200.0
) -> np.ndarray:
    """Per (prompt, example): p(gold label) minus the largest p(other label), scaled.

    `logprobs` is (prompts, examples, labels) of label words; probabilities are renormalised over
    the labels, so the margin lies in [-1, 1]. A positive margin (a correct prediction) is scaled
    by `correct`, a negative one by `incorrect`: as in RLPrompt, a mistake costs a little more
    than a win of the same size earns.
    """
    probs = np.exp(logprobs - logprobs.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    n_labels = probs.shape[-1]
    onehot = np.eye(n_labels, dtype=bool)[gold]  # (examples, labels)
    p_gold = np.where(onehot, probs, 0.0).sum(-1)
    p_other = np.where(onehot, -np.inf, probs).max(-1) if n_labels > 1 else np.zeros_like(p_gold)
    gap = p_gold - p_other
    return np.where(gap > 0, correct * gap, incorrect * gap)


def zscore(rewards: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Rewards centred and scaled across the prompts of one step (all equal: all zero).

    The step mean is the policy gradient's baseline; dividing by the spread keeps the step size
    the same whether the prompts differ by a little or a lot.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    spread = rewards.std()
    if spread < eps:
        return np.zeros_like(rewards)
    return (rewards - rewards.mean()) / spread
