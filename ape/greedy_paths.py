"""Greedy paths the scorer has already computed: a reference answer checked token by token.

Scoring a reference continuation computes the model's logits at every position of it. Where the
argmax there is the reference token, greedy decoding would have picked that token too; at the
first position where it is not, greedy decoding picks the argmax. So one scoring pass gives,
per (context, continuation), the first tokens greedy decoding would generate after the context:
the continuation up to where the model leaves it, then the token it picks there (with the
continuation's last token fed, also the token after a whole match). ape's metric evidence scores
the test split by log-likelihood and then decodes greedily from the same contexts: with the
paths recorded, a row whose path already reaches a stop, EOS or the token cap needs no decoding,
and every other row decodes on from the end of its path instead of from its context.

The texts are those of plain greedy decoding, up to float rounding of the logits (the scoring
pass batches rows differently from a decoding pass, as two decoding batches do).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

from ape.decoding import Stop, first_stop

# Contexts remembered, most recent first out last: the evidence decodes from the contexts it
# scored just before, a few prompts times the test rows.
DEFAULT_CAPACITY = 4096


class GreedyPaths:
    """An LRU map from context tokens to the first tokens greedy decoding generates after it."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        self.capacity = capacity
        self.paths: OrderedDict[tuple[int, ...], tuple[int, ...]] = OrderedDict()
        self.recording = False
        self.hits = 0

    def __len__(self) -> int:
        return len(self.paths)

    def record(self, context: Sequence[int], path: Sequence[int]) -> None:
        """Keep the longest path known for `context`."""
        key = tuple(context)
        known = self.paths.pop(key, ())
        self.paths[key] = tuple(path) if len(path) > len(known) else known
        while len(self.paths) > self.capacity:
            self.paths.popitem(last=False)

    def lookup(self, context: Sequence[int]) -> tuple[int, ...]:
        """The known greedy path after `context` (empty when none is)."""
        path = self.paths.get(tuple(context), ())
        self.hits += bool(path)
        return path

    def clear(self) -> None:
        self.paths.clear()


def path_of(targets: Sequence[int], picks: Sequence[int]) -> list[int]:
    """The greedy path a scored continuation shows: `picks[j]` is the argmax at the position
    that `targets[j]` was scored at (one more pick than targets when the last target was fed)."""
    path = []
    for j, pick in enumerate(picks):
        path.append(pick)
        if j >= len(targets) or pick != targets[j]:
            break
    return path


def settled(
    path: Sequence[int],
    decode: Callable[[list[int]], str],
    *,
    max_new_tokens: int,
    eos: frozenset[int],
    stop: Sequence[Stop],
) -> tuple[list[int], bool]:
    """What of a known greedy `path` decoding would generate, and whether decoding would end
    inside it: at EOS (left out, as decoding leaves it out), at the token cap, or once the text
    (`decode(tokens)`) holds a stop (the caller cuts the text there, as after decoding)."""
    tokens = list(path[:max_new_tokens])
    for k, token in enumerate(tokens):
        if token in eos:
            return tokens[:k], True
    if len(tokens) >= max_new_tokens:
        return tokens, True
    return tokens, bool(stop) and first_stop(decode(tokens), stop) >= 0
