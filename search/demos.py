"""Demonstration sets: seeded draws, class balance, mutations, and how a demo is shown.

A demo set is a tuple of training examples in the order the prompt shows them. For a task with
labels, draws are class-balanced (classes take turns, in a seeded order), since a few-shot prompt
that shows one class only teaches the model to answer that class.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ape.capabilities import LABEL_LOGPROBS, offers
from ape.task import Example

if TYPE_CHECKING:
    from ape.objective import Objective

DemoSet = tuple[Example, ...]


def random_demos(train: Sequence[Example], k: int, seed: int) -> DemoSet:
    """The `demos` baseline's set: k examples drawn uniformly with `seed` (no class balance)."""
    if len(train) < k:
        raise ValueError(f"k={k} demos asked, but the training split has {len(train)} rows")
    rng = np.random.default_rng(seed)
    return tuple(train[i] for i in rng.choice(len(train), k, replace=False))


def balanced_draw(train: Sequence[Example], k: int, rng: np.random.Generator) -> DemoSet:
    """k examples without repeats; when outputs repeat (labels), classes take turns."""
    by_output: dict[str, list[int]] = defaultdict(list)
    for i, example in enumerate(train):
        by_output[example.output].append(i)
    if len(by_output) > len(train) // 2:  # mostly distinct outputs: not a labelled task
        picked = rng.choice(len(train), min(k, len(train)), replace=False)
        return tuple(train[i] for i in picked)
    queues = {label: list(rng.permutation(idx)) for label, idx in sorted(by_output.items())}
    labels = [str(label) for label in rng.permutation(sorted(queues))]
    picked: list[int] = []
    while len(picked) < min(k, len(train)):
        for label in labels:
            if queues[label] and len(picked) < k:
                picked.append(int(queues[label].pop()))
    order = rng.permutation(len(picked))  # classes do not come in a fixed cycle
    return tuple(train[picked[i]] for i in order)


def draw_sets(train: Sequence[Example], count: int, k: int, seed: int) -> list[DemoSet]:
    """`count` seeded demo sets of `k` examples each (sets may overlap)."""
    rng = np.random.default_rng([seed, 2])  # a stream apart from proposals and baselines
    return [balanced_draw(train, k, rng) for _ in range(count)]


def mutations(
    demos: DemoSet, train: Sequence[Example], max_demos: int, rng: np.random.Generator
) -> list[DemoSet]:
    """Neighbours of a demo set: one demo swapped, the order shuffled, one more or one fewer."""
    out: list[DemoSet] = []
    unused = [e for e in train if e not in demos]
    if demos and unused:
        i = int(rng.integers(len(demos)))
        same_class = [e for e in unused if e.output == demos[i].output]
        pool = same_class or unused
        swapped = list(demos)
        swapped[i] = pool[int(rng.integers(len(pool)))]
        out.append(tuple(swapped))
    if len(demos) > 1:
        out.append(tuple(demos[i] for i in rng.permutation(len(demos))))
        out.append(demos[1:])  # the first shown is the one furthest from the input
    if len(demos) < max_demos and unused:
        out.append((unused[int(rng.integers(len(unused)))], *demos))
    return out


def shown(demos: DemoSet, words: Mapping[str, str]) -> DemoSet:
    """The demos as the prompt shows them: a label's output becomes the word that is scored."""
    if not words:
        return demos
    return tuple(Example(d.input, words.get(d.output, d.output)) for d in demos)


def label_words(objective: Objective) -> dict[str, str]:
    """label -> the word the evaluator scores for it (empty when it scores the outputs)."""
    if not offers(objective.evaluator, LABEL_LOGPROBS):
        return {}
    labels, words = objective.evaluator.label_words(objective.task.train + objective.task.val)
    return dict(zip(labels, words, strict=True))
