"""A bounded, least-recently-used cache of prefix KV states across scoring calls.

A search scores the same instruction and demonstrations again and again, each time on new
validation examples. Their shared prefix's keys and values depend only on its tokens (attention
is causal), so the scorer keeps them: a later call whose group prefix starts with cached tokens
reads their KV instead of recomputing it. Any common start of a cached key serves, not only the
whole key: the KV of a key's first c tokens is its state's first c slots.

Held to a byte cap: the least recently used entries go first. SmolLM2-135M keeps about 46 KB per
token in float32 (30 layers x keys and values x 3 heads x 64), so a prompt of 8 demonstrations
(~100 tokens) takes ~4.6 MB and the default 256 MB holds ~55 of them.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np
import torch

from ape.kv_cache import LayerStates

DEFAULT_MB = 256
ENV_MB = "APE_PREFIX_CACHE_MB"


def default_bytes() -> int:
    """The cap: $APE_PREFIX_CACHE_MB megabytes (0 turns the cache off), else 256 MB."""
    text = os.environ.get(ENV_MB, "").strip()
    try:
        mb = float(text) if text else DEFAULT_MB
    except ValueError:
        raise ValueError(f"{ENV_MB}={text!r} is not a number of megabytes") from None
    if mb < 0:
        raise ValueError(f"{ENV_MB}={text!r} must be 0 (off) or more")
    return int(mb * 2**20)


class PrefixCache:
    """Prefix token ids -> their per-layer (keys, values), [1, heads, tokens, dim] each."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[int, ...], tuple[np.ndarray, LayerStates]] = OrderedDict()
        self.bytes = 0
        self.read_tokens = 0  # prefix tokens read from the cache instead of run

    def __len__(self) -> int:
        return len(self.entries)

    def longest(self, tokens: tuple[int, ...]) -> tuple[int, LayerStates]:
        """The longest start of `tokens` that the cache holds, and that start's KV (or 0, [])."""
        if not self.entries:
            return 0, []
        query = np.asarray(tokens, dtype=np.int64)
        best, best_key = 0, None
        for key, (array, _) in self.entries.items():
            n = min(len(array), len(query))
            if n <= best:
                continue
            same = array[:n] == query[:n]
            length = n if same.all() else int(np.argmin(same))
            if length > best:
                best, best_key = length, key
        if best_key is None:
            return 0, []
        self.entries.move_to_end(best_key)
        state = self.entries[best_key][1]
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in state]

    def put(self, tokens: tuple[int, ...], state: LayerStates) -> None:
        """Keep `state` (the KV of `tokens`, copied out of its batch) and evict down to the cap."""
        size = nbytes(state)
        if not tokens or size > self.max_bytes or tokens in self.entries:
            return
        # A cached key that starts the new one is served by the new one from now on.
        for key in [k for k in self.entries if len(k) < len(tokens) and tokens[: len(k)] == k]:
            self.drop(key)
        copied = [(k.contiguous().clone(), v.contiguous().clone()) for k, v in state]
        self.entries[tokens] = (np.asarray(tokens, dtype=np.int64), copied)
        self.bytes += size
        while self.bytes > self.max_bytes:
            self.drop(next(iter(self.entries)))

    def drop(self, key: tuple[int, ...]) -> None:
        _, state = self.entries.pop(key)
        self.bytes -= nbytes(state)

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0


def nbytes(state: LayerStates) -> int:
    """Bytes of a state's keys and values (of one shape per layer)."""
    return sum(k.nelement() * k.element_size() + v.nelement() * v.element_size() for k, v in state)


def usable(soft: object | None) -> bool:
    """Whether a call may read and fill the cache: no soft prefix (its KV is the caller's own,
    possibly trained) and no gradients (cached tensors carry none)."""
    return soft is None and not torch.is_grad_enabled()
