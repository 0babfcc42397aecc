"""Language models behind one small interface: batched log-likelihood and batched generation.

`HFLanguageModel.loglikelihood` is the hot path of the whole product. Requests are
(context, continuation) pairs; for each we want log p(continuation | context). How it is fast:

1. Tokenize context+continuation together and split at the context's length (the way
   lm-evaluation-harness does), so the seam is tokenized as the model would see it (here).
2. Requests whose model input is identical (e.g. one context with several one-token labels) share
   one row: a row is the token sequence fed to the model plus the (position, target) pairs read.
3. Rows are sorted by their tokens, so rows sharing a prefix (one instruction across many examples)
   are neighbours. Each run of rows with a long common prefix is a group: the prefix runs once, its
   KV cache is expanded over the batch, and only the suffixes run. Prefix KV states are kept
   across calls (a bounded LRU, ape/prefix_cache.py), so a prompt scored again on new examples
   does not run its prefix again.
4. Suffixes are packed side by side into sequences of about `pack_tokens`, with an attention mask
   that lets each one see the shared prefix and itself only, and position ids that restart per
   suffix. No compute goes to padding, and matrix multiplies get long, efficient shapes.
5. Only the scored positions are projected to the vocabulary.
6. Batches are capped by a token budget that halves on out-of-memory instead of crashing.

Within `recording_greedy_paths()`, scoring also records the greedy path each scored continuation
shows (ape/greedy_paths.py), and greedy `generate` from those contexts starts after it.

Steps 2-4 are pure bookkeeping in ape/packing.py; 3, 5 and 6 run in ape/scoring.py; every call
that depends on the transformers version (the KV cache) is in ape/kv_cache.py; generation and
chat templates are in ape/hf_generate.py. This module is the facade over them.

A soft prompt (trained vectors in the model's embedding space, see search/soft/) goes through
the same path: its KV is computed once per call and every group's prefix, and every suffix,
attends to it, exactly as to a text prefix. `loglikelihood_tensor` is the same computation with
gradients on, so a soft prompt is trained through the scorer it is evaluated with.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol, runtime_checkable

import numpy as np
import torch

import ape.hf_generate as hf_generate
from ape.greedy_paths import GreedyPaths, path_of
from ape.prefix_cache import PrefixCache, default_bytes
from ape.scoring import PackedScorer, context_window

Request = tuple[str, str]


@runtime_checkable
class LanguageModel(Protocol):
    """What evaluators and searchers need from a model."""

    name: str

    def loglikelihood(
        self, requests: Sequence[Request], *, return_counts: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]: ...

    def generate(
        self,
        prompts: Sequence[str],
        n: int = 1,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_new_tokens: int = 32,
        seed: int | None = None,
        chat: bool = False,
        stop: Sequence[str] | None = None,
    ) -> list[list[str]]: ...


def batch_budgets(device: torch.device) -> tuple[int, int]:
    """The scorer's default (tokens per batch, tokens per pack) on `device`.

    A pack's attention grows with the square of its width, and on a CPU a batch of about 2k
    rows keeps the layer products in cache: 2048/128 scored the three benchmarks/scoring
    workloads 11-22% faster than 4096/256 on the 2-core CPU (2026-12-03). Accelerators keep
    the larger batches.
    """
    return (2048, 128) if device.type == "cpu" else (4096, 256)


class HFLanguageModel:
    """A Hugging Face causal LM with exact, batched, prefix-sharing log-likelihood scoring."""

    def __init__(
        self,
        model,
        tokenizer,
        name: str = "model",
        max_batch_tokens: int | None = None,
        pack_tokens: int | None = None,
        prefix_cache_bytes: int | None = None,
    ):
        """`max_batch_tokens` / `pack_tokens` (None: by device, see `batch_budgets`);
        `prefix_cache_bytes` caps the cross-call cache of prefix KV states (ape/prefix_cache.py;
        None: $APE_PREFIX_CACHE_MB, else 256 MB; 0: off)."""
        self.model = model
        batch_default, pack_default = batch_budgets(self.device)
        self.tokenizer = tokenizer
        self.name = name
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        bos = tokenizer.bos_token_id
        # Conditioning token for an empty context (lm-evaluation-harness uses the same choice).
        self.prefix_token_id = bos if bos is not None else tokenizer.eos_token_id
        cap = default_bytes() if prefix_cache_bytes is None else prefix_cache_bytes
        self.scorer = PackedScorer(
            model,
            tokenizer.pad_token_id,
            batch_default if max_batch_tokens is None else max_batch_tokens,
            pack_default if pack_tokens is None else pack_tokens,
            PrefixCache(cap) if cap > 0 else None,
        )
        self.greedy_paths = GreedyPaths()

    # The scorer's batch budgets, which its out-of-memory back-off halves in place.
    @property
    def max_batch_tokens(self) -> int:
        return self.scorer.max_batch_tokens

    @max_batch_tokens.setter
    def max_batch_tokens(self, value: int) -> None:
        self.scorer.max_batch_tokens = value

    @property
    def pack_tokens(self) -> int:
        return self.scorer.pack_tokens

    @pack_tokens.setter
    def pack_tokens(self, value: int) -> None:
        self.scorer.pack_tokens = value

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def clear_prefix_cache(self) -> None:
        """Drop the prefix KV states kept across scoring calls (their memory goes back)."""
        if self.scorer.prefix_cache is not None:
            self.scorer.prefix_cache.clear()

    @contextmanager
    def recording_greedy_paths(self) -> Iterator[None]:
        """Within it, scoring also records the greedy path each scored continuation shows, so
        greedy generation from those contexts later starts from it (ape/greedy_paths.py).
        Each scored row then also feeds its last token: a little more compute."""
        before = self.greedy_paths.recording
        self.greedy_paths.recording = True
        try:
            yield
        finally:
            self.greedy_paths.recording = before

    @property
    def max_length(self) -> int:
        return context_window(self.model)

    def encode_pairs(self, requests: Sequence[Request]) -> list[tuple[list[int], list[int]]]:
        """(context tokens, continuation tokens) per request, split at the tokenization seam."""
        contexts, wholes = [], []
        for i, (context, continuation) in enumerate(requests):
            if not continuation:
                raise ValueError(f"request {i} has an empty continuation; nothing to score")
            # Trailing context whitespace belongs to the continuation's first token.
            stripped = context.rstrip()
            continuation = context[len(stripped) :] + continuation
            contexts.append(stripped)
            wholes.append(stripped + continuation)
        enc = self.tokenizer(contexts + wholes, add_special_tokens=False)["input_ids"]
        pairs = []
        for i, (ctx, whole) in enumerate(
            zip(enc[: len(requests)], enc[len(requests) :], strict=True)
        ):
            # lm-evaluation-harness's split: the context as tokenized alone, the continuation as
            # the rest of the joint tokenization.
            continuation_ids = whole[len(ctx) :]
            if not continuation_ids:
                raise ValueError(
                    f"request {i}: the continuation {requests[i][1]!r} has no tokens of its own; "
                    f"it merges into the context's last token. Start it with a space or separator"
                )
            pairs.append((ctx or [self.prefix_token_id], continuation_ids))
        return pairs

    def loglikelihood(
        self,
        requests: Sequence[Request],
        *,
        return_counts: bool = False,
        soft_prefix: torch.Tensor | None = None,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Summed log-prob of each continuation given its context, in request order.

        With `return_counts`, also the continuation token counts (for the per-token mean).
        With `soft_prefix`, every request's model input starts with n virtual tokens, then the
        context's tokens: [n, d_model] vectors in the input-embedding space (prompt tuning), or
        [layers, 2, kv_heads, n, head_dim] keys (index 0) and values (1) per layer that every
        position attends to as to a cached prefix (prefix tuning; the text starts at position n).
        """
        with torch.inference_mode():
            sums, counts = self.loglikelihood_tensor(requests, soft_prefix=soft_prefix)
        sums = sums.cpu().numpy()
        return (sums, counts) if return_counts else sums

    def loglikelihood_tensor(
        self, requests: Sequence[Request], *, soft_prefix: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, np.ndarray]:
        """`loglikelihood` as a float64 tensor (and the token counts), differentiable.

        Gradients flow to `soft_prefix` when grad mode is on; freeze the model's own parameters
        first (`requires_grad_(False)`) or backward also computes their (unused) gradients.
        """
        pairs = self.encode_pairs(requests)
        counts = np.array([len(cont) for _, cont in pairs], dtype=np.int64)
        if not self.greedy_paths.recording or soft_prefix is not None:
            return self.scorer.score(pairs, soft_prefix), counts
        picks: list[list[int]] = []
        sums = self.scorer.score(pairs, picks=picks)
        for (context, continuation), picked in zip(pairs, picks, strict=True):
            self.greedy_paths.record(context, path_of(continuation, picked))
        return sums, counts

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str],
        n: int = 1,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_new_tokens: int = 32,
        seed: int | None = None,
        chat: bool = False,
        stop: Sequence[hf_generate.Stop] | None = None,
        batch_size: int = 32,
    ) -> list[list[str]]:
        """`n` completions per prompt (greedy when temperature is 0), cut at the first `stop`.

        Each prompt runs once for all its samples and prompts that share a prefix run it once
        (see ape/shared_generation.py). A stop is a string or a compiled pattern (e.g.
        `ape.hf_generate.SENTENCE_END`); `batch_size` is the rows decoded together. The same
        seed gives the same texts, whatever the batch size.
        """
        settings = dict(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        return self.generate_groups(
            [(prompts, seed, chat)], stop=stop, batch_size=batch_size, **settings
        )[0]

    @torch.inference_mode()
    def generate_groups(
        self,
        groups: Sequence[tuple[Sequence[str], int | None, bool]],
        n: int = 1,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_new_tokens: int = 32,
        stop: Sequence[hf_generate.Stop] | None = None,
        batch_size: int = 32,
    ) -> list[list[list[str]]]:
        """Per (prompts, seed, chat) group, what `generate(prompts, seed=seed, chat=chat)` would
        return, from one decoding run: a pass decodes rows of every group (fewer passes)."""
        seeded = [
            ([self.chat_prompt(p) for p in prompts] if chat else list(prompts), seed)
            for prompts, seed, chat in groups
        ]
        return hf_generate.generate_groups(
            self.model,
            self.tokenizer,
            seeded,
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            stop=stop,
            batch_size=batch_size,
            known=self.greedy_paths.lookup,
        )

    def chat_prompt(self, message: str) -> str:
        """`message` as a user turn in the model's chat template, ready for the reply."""
        return hf_generate.chat_prompt(self.tokenizer, message)
