"""Exact, batched, prefix-sharing log-likelihood of token continuations: the scorer's engine.

Given (context, continuation) token ids per request, `PackedScorer.score` returns the summed
log-prob of each continuation. Rows, groups and packs come from ape/packing.py; every KV-cache
call goes through ape/kv_cache.py. The steps:

1. The shared prefix of each group runs once, all prefixes packed into as few sequences as
   possible; its KV is then laid under every pack of the group.
2. Suffixes run packed side by side; only the scored positions are projected to the vocabulary.
3. Packs are batched widest first, among packs of about their width (little padding), and
   batches are capped by a token budget that halves on out-of-memory instead of crashing.

A soft prompt's KV is computed once per call (a key/value prefix is that KV already) and every
prefix and suffix attends to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import ape.kv_cache as kv_cache
import ape.packing as packing
from ape.kv_cache import LayerStates
from ape.packing import Group, Pack, PackedBatch, Pairs
from ape.prefix_cache import PrefixCache, usable
from ape.vocab_head import read_logprobs

# Per group, the KV of its shared prefix ([] for a group without one).
PrefixStates = list[LayerStates]


@dataclass
class Reads:
    """One batch's reads: the request of each, its log-prob, and (when asked) the argmax token
    at its position."""

    owner: torch.Tensor
    logprob: torch.Tensor
    pick: torch.Tensor | None = None


def context_window(model) -> int:
    """The model's window in tokens (2048 when its config does not say)."""
    config = model.config.get_text_config()
    return int(getattr(config, "max_position_embeddings", None) or 2048)


class PackedScorer:
    """Runs packed rows through a causal LM; holds the batch budgets the back-off halves."""

    def __init__(
        self,
        model,
        pad_id: int,
        max_batch_tokens: int,
        pack_tokens: int,
        prefix_cache: PrefixCache | None = None,
    ):
        self.model = model
        self.pad_id = pad_id
        self.max_batch_tokens = max_batch_tokens
        self.pack_tokens = pack_tokens
        self.prefix_cache = prefix_cache

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def score(
        self,
        pairs: Pairs,
        soft_prefix: torch.Tensor | None = None,
        picks: list[list[int]] | None = None,
    ) -> torch.Tensor:
        """Summed continuation log-prob per pair, float64, in pair order (differentiable).

        `soft_prefix`: [n, d_model] input embeddings, or [layers, 2, kv_heads, n, head_dim] keys
        and values (a key/value prefix); either takes the first n positions.
        `picks`: a list to fill with, per pair, the argmax token at each scored position and,
        after them, at the continuation's last token (which is then fed too): see
        ape/greedy_paths.py.
        """
        soft = None if soft_prefix is None else self.soft_state(soft_prefix)
        offset = 0 if soft is None else int(soft[0][0].shape[2])
        window = context_window(self.model)
        rows = packing.make_rows(pairs, window, offset, feed_last=picks is not None)
        groups = packing.group_rows(rows)
        prefixes = self.prefix_states(groups, soft)
        reads: list[Reads] = []
        # Packed after the prefixes ran: an out-of-memory there has already halved the budgets.
        packs = packing.suffix_packs(groups, self.pack_tokens)
        for batch in list(packing.batched(packs, self.max_batch_tokens)):
            self.with_backoff(self.forward_batch, batch, prefixes, reads, offset)
        sums = torch.zeros(len(pairs), dtype=torch.float64, device=self.device)
        if reads:
            owners = torch.cat([read.owner for read in reads])
            values = torch.cat([read.logprob for read in reads])
            sums = sums.index_add(0, owners, values)
        if picks is not None:
            picks[:] = [[] for _ in pairs]
            # A batch reads picks only where it has a row that fed its last token.
            for read in (r for r in reads if r.pick is not None):
                for owner, pick in zip(read.owner.tolist(), read.pick.tolist(), strict=True):
                    picks[owner].append(pick)
        return sums

    def soft_state(self, soft_prefix: torch.Tensor) -> LayerStates:
        """Per layer, the (keys, values) of the soft prefix, [1, heads, n, dim]: embeddings run
        once; a key/value prefix is its own state, laid into the cache as a text prefix's is."""
        if soft_prefix.ndim == 5:
            return self.kv_state(soft_prefix)
        if soft_prefix.ndim != 2 or soft_prefix.shape[0] == 0:
            raise ValueError(f"a soft prefix is [n > 0, d_model], got {tuple(soft_prefix.shape)}")
        embeds = soft_prefix.to(self.device, self.model.dtype)[None]
        positions = torch.arange(embeds.shape[1], device=self.device)[None]
        _, cache = kv_cache.run(
            self.model.base_model, inputs_embeds=embeds, position_ids=positions, use_cache=True
        )
        return kv_cache.layer_states(cache)

    def kv_state(self, kv: torch.Tensor) -> LayerStates:
        """[layers, 2, kv_heads, n, head_dim] keys (0) and values (1) as per-layer states.

        The keys enter the cache as they are: like a text prefix's cached keys, they are taken
        as already rotated, and the text after them starts at position n (as PEFT does).
        """
        layers, heads, dim = kv_cache.kv_shape(self.model)
        if tuple(kv.shape[:3]) != (layers, 2, heads) or kv.shape[4] != dim or not kv.shape[3]:
            raise ValueError(
                f"a key/value prefix for this model is [{layers}, 2, {heads}, n > 0, {dim}], "
                f"got {tuple(kv.shape)}"
            )
        kv = kv.to(self.device, self.model.dtype)
        return [(kv[i, 0][None], kv[i, 1][None]) for i in range(layers)]

    def prefix_states(self, groups: list[Group], soft: LayerStates | None = None) -> PrefixStates:
        """Per group, per layer: the (keys, values) of its shared prefix, [1, heads, prefix, dim].

        All prefixes run together, packed into as few sequences as possible. With a soft prefix's
        KV `soft`, each prefix runs after it and its state starts with it; a group with no shared
        text prefix gets the soft KV alone.
        """
        cache = self.prefix_cache if self.prefix_cache is not None and usable(soft) else None
        states: PrefixStates = [[] for _ in groups]
        starts: PrefixStates = [[] for _ in groups]
        if cache is not None:
            self.read_cached(groups, states, starts, cache)
        todo = [p for p in packing.prefix_packs(groups) if not states[p.group]]
        fresh = [p for p in todo if not starts[p.group]]
        for batch in packing.batched(fresh, self.max_batch_tokens):
            self.with_backoff(self.prefix_batch, batch, states, soft)
        # The rest of a prefix whose start is cached runs after that start's KV.
        rest = [
            Pack(p.rows, starts[p.group][0][0].shape[2], p.group) for p in todo if starts[p.group]
        ]
        for batch in packing.batched(rest, self.max_batch_tokens):
            self.with_backoff(self.extend_batch, batch, starts, states)
        if cache is not None:
            for one in todo:
                cache.put(one.rows[0].tokens, states[one.group])
        if soft is not None:
            for k, group in enumerate(groups):
                if not group.prefix_len:
                    states[k] = soft
        return states

    @staticmethod
    def read_cached(
        groups: list[Group], states: PrefixStates, starts: PrefixStates, cache: PrefixCache
    ) -> None:
        """Fill `states` (whole prefixes) and `starts` (their starts) from the cache.

        A group whose prefix the cache holds only the start of is either cut back to that start
        when the rest is a few tokens (a common start of the examples after the prompt, say: its
        rows then run those tokens), or its prefix is marked to run after the cached start.
        """
        for k, group in enumerate(groups):
            if not group.prefix_len:
                continue
            held, state = cache.longest(group.rows[0].tokens[: group.prefix_len])
            if held < packing.MIN_SHARED_PREFIX:
                continue
            cache.read_tokens += held
            if (group.prefix_len - held) * len(group.rows) <= held:
                group.prefix_len = held
                states[k] = state
            else:
                starts[k] = state

    def prefix_batch(
        self, batch: list[Pack], states: PrefixStates, soft: LayerStates | None = None
    ) -> None:
        """Run one batch of prefixes; store each one's state (soft prefix's first) in `states`."""
        offset = soft[0][0].shape[2] if soft else 0
        packed = packing.pack(batch, offset, self.pad_id, offset=offset)
        cache = kv_cache.expanded_cache(self.model.config, soft, len(batch)) if soft else None
        _, cache = self.run(packed, cache, keep_cache=True)
        layers = kv_cache.layer_states(cache)
        for b, one in enumerate(batch):
            # A prefix pack holds one row, so it starts at slot 0 after the soft prefix's
            # `offset` slots: its state is the soft prefix's slots followed by its own.
            ((_, end),) = packed.spans[b]
            keep = slice(0, offset + end)
            states[one.group] = [(k[b : b + 1, :, keep], v[b : b + 1, :, keep]) for k, v in layers]

    def extend_batch(self, batch: list[Pack], starts: PrefixStates, states: PrefixStates) -> None:
        """Run the rest of each prefix after its cached start; store start + rest in `states`."""
        width = max(p.prefix_len for p in batch)
        packed = packing.pack(batch, width, self.pad_id)
        cache = kv_cache.padded_cache(self.model.config, [starts[p.group] for p in batch], width)
        _, cache = self.run(packed, cache, keep_cache=True)
        layers = kv_cache.layer_states(cache)
        for b, one in enumerate(batch):
            # The start sits left-aligned in the first `width` slots, the rest after them.
            ((_, end),) = packed.spans[b]
            held, rest = slice(0, one.prefix_len), slice(width, width + end)
            states[one.group] = [
                (
                    torch.cat([k[b : b + 1, :, held], k[b : b + 1, :, rest]], dim=2),
                    torch.cat([v[b : b + 1, :, held], v[b : b + 1, :, rest]], dim=2),
                )
                for k, v in layers
            ]

    def with_backoff(self, step: Callable[..., None], packs: list[Pack], *args) -> None:
        """Run `step(packs, *args)`, halving the batch on out-of-memory until one row fails."""
        try:
            step(packs, *args)
        except RuntimeError as err:
            singles = packing.singles(packs)
            if not is_out_of_memory(err) or len(singles) == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.max_batch_tokens = max(1, self.max_batch_tokens // 2)
            self.pack_tokens = max(1, self.pack_tokens // 2)
            half = len(singles) // 2
            self.with_backoff(step, singles[:half], *args)
            self.with_backoff(step, singles[half:], *args)

    def forward_batch(
        self,
        packs: list[Pack],
        prefixes: PrefixStates,
        reads: list[Reads],
        offset: int = 0,
    ) -> None:
        """Score one batch; append its reads' request indices, log-probs and argmax tokens."""
        width = offset + max(p.prefix_len for p in packs)
        packed = packing.pack(packs, width, self.pad_id, offset=offset)
        cache = None
        if width:
            # Room for the suffixes: their keys and values are written in place after the
            # prefix, not concatenated to it (a copy of the whole KV per layer).
            cache = kv_cache.padded_cache(
                self.model.config,
                [prefixes[p.group] for p in packs],
                width,
                room=packed.ids.shape[1],
            )
        out, _ = self.run(packed, cache, keep_cache=False)
        hidden = out.last_hidden_state  # [packs, width, d_model]
        device = hidden.device
        # Each scored position is projected once, however many reads it has (several label
        # words, duplicate requests): less head compute, and equal requests get equal scores.
        flat = packed.read_pack.to(device) * hidden.shape[1] + packed.read_offset.to(device)
        positions, which = torch.unique(flat, return_inverse=True)
        selected = hidden.reshape(-1, hidden.shape[-1])[positions]
        targets = packed.read_target.to(device)
        owner = torch.from_numpy(packed.read_owner).to(device)
        asked = targets == packing.NO_TARGET  # reads that score nothing, only pick
        logprob, pick = read_logprobs(
            self.model, selected, which, targets.clamp(min=0), bool(asked.any())
        )
        picked = logprob.double().masked_fill(asked, 0.0)
        reads.append(Reads(owner, picked, pick))

    def run(self, packed: PackedBatch, cache, keep_cache: bool):
        """One forward pass of the decoder (no vocabulary head) over a packed batch."""
        device, dtype = self.device, self.model.dtype
        allowed = packed.allowed.to(device)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return kv_cache.run(
            self.model.base_model,
            cache=cache,
            input_ids=packed.ids.to(device),
            position_ids=packed.positions.to(device),
            attention_mask=mask[:, None],  # [packs, 1, query, prefix + query]
            use_cache=keep_cache,  # a given cache is read either way
        )


def is_out_of_memory(err: RuntimeError) -> bool:
    text = str(err).lower()
    return "out of memory" in text or "can't allocate memory" in text
