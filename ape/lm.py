"""Language models behind one small interface: batched log-likelihood and batched generation.

`HFLanguageModel.loglikelihood` is the hot path of the whole product. Requests are
(context, continuation) pairs; for each we want log p(continuation | context). How it is fast:

1. Tokenize context+continuation together and split at the context's length (the way
   lm-evaluation-harness does), so the seam is tokenized as the model would see it.
2. Requests whose model input is identical (e.g. one context with several one-token labels) share
   one row: a row is the token sequence fed to the model plus the (position, target) pairs read.
3. Rows are sorted by their tokens, so rows sharing a prefix (one instruction across many examples)
   are neighbours. Each run of rows with a long common prefix is a group: the prefix runs once, its
   KV cache is expanded over the batch, and only the suffixes run.
4. Suffixes are packed side by side into sequences of about `pack_tokens`, with an attention mask
   that lets each one see the shared prefix and itself only, and position ids that restart per
   suffix. No compute goes to padding, and matrix multiplies get long, efficient shapes.
5. Only the scored positions are projected to the vocabulary.
6. Batches are capped by a token budget that halves on out-of-memory instead of crashing.

A soft prompt (trained vectors in the model's embedding space, see ape/soft_prompt.py) goes through
the same path: its KV is computed once per call and every group's prefix, and every suffix,
attends to it, exactly as to a text prefix. `loglikelihood_tensor` is the same computation with
gradients on, so a soft prompt is trained through the scorer it is evaluated with.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from transformers import DynamicCache

Request = tuple[str, str]

# A shared prefix shorter than this is not worth a separate forward pass.
MIN_SHARED_PREFIX = 4


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


@dataclass
class _Row:
    """One sequence fed to the model and the (position, target, request) triples read off it."""

    tokens: tuple[int, ...]
    first_scored: int  # the earliest scored position; a shared prefix must end at or before it
    reads: list[tuple[int, int, int]] = field(default_factory=list)


@dataclass
class _Group:
    """Rows that share their first `prefix_len` tokens (0: no shared prefix)."""

    rows: list[_Row]
    prefix_len: int


class HFLanguageModel:
    """A Hugging Face causal LM with exact, batched, prefix-sharing log-likelihood scoring."""

    def __init__(
        self,
        model,
        tokenizer,
        name: str = "model",
        max_batch_tokens: int = 4096,
        pack_tokens: int = 256,
    ):
        self.model = model
        self.pack_tokens = pack_tokens
        self.tokenizer = tokenizer
        self.name = name
        self.max_batch_tokens = max_batch_tokens
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        bos = tokenizer.bos_token_id
        # Conditioning token for an empty context (lm-evaluation-harness uses the same choice).
        self.prefix_token_id = bos if bos is not None else tokenizer.eos_token_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_length(self) -> int:
        config = self.model.config.get_text_config()
        return int(getattr(config, "max_position_embeddings", None) or 2048)

    # ---------------------------------------------------------------- tokenization
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

    # ---------------------------------------------------------------- scoring
    def loglikelihood(
        self,
        requests: Sequence[Request],
        *,
        return_counts: bool = False,
        soft_prefix: torch.Tensor | None = None,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Summed log-prob of each continuation given its context, in request order.

        With `return_counts`, also the continuation token counts (for the per-token mean).
        With `soft_prefix` ([n, d_model] vectors in the input-embedding space), every request's
        model input starts with those n vectors, then the context's tokens.
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
        soft = None if soft_prefix is None else self._soft_state(soft_prefix)
        offset = 0 if soft_prefix is None else int(soft_prefix.shape[0])
        groups = _group_rows(self._rows(pairs, offset))
        prefixes = self._prefix_states(groups, soft)
        reads: list[tuple[torch.Tensor, torch.Tensor]] = []
        for batch in self._batches(groups):
            self._with_backoff(self._forward_batch, batch, prefixes, reads, offset)
        sums = torch.zeros(len(pairs), dtype=torch.float64, device=self.device)
        if reads:
            owners = torch.cat([owner for owner, _ in reads])
            values = torch.cat([value for _, value in reads])
            sums = sums.index_add(0, owners, values)
        return sums, counts

    def _soft_state(self, soft_prefix: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """Per layer, the (keys, values) of the soft prefix, [1, heads, n, dim]: run once."""
        if soft_prefix.ndim != 2 or soft_prefix.shape[0] == 0:
            raise ValueError(f"a soft prefix is [n > 0, d_model], got {tuple(soft_prefix.shape)}")
        embeds = soft_prefix.to(self.device, self.model.dtype)[None]
        positions = torch.arange(embeds.shape[1], device=self.device)[None]
        out = self.model.base_model(inputs_embeds=embeds, position_ids=positions, use_cache=True)
        return [(layer.keys, layer.values) for layer in out.past_key_values.layers]

    def _rows(self, pairs: list[tuple[list[int], list[int]]], offset: int = 0) -> list[_Row]:
        rows: dict[tuple[int, ...], _Row] = {}
        for i, (context, continuation) in enumerate(pairs):
            whole = context + continuation
            if offset + len(whole) - 1 > self.max_length:
                raise ValueError(
                    f"request {i} is {offset + len(whole)} tokens long, more than the model's "
                    f"window of {self.max_length} tokens; shorten its input or demonstrations"
                )
            tokens = tuple(whole[:-1])  # the last token is only a target, never an input
            start = len(context) - 1
            row = rows.get(tokens)
            if row is None:
                row = rows[tokens] = _Row(tokens, first_scored=start)
            row.first_scored = min(row.first_scored, start)
            row.reads.extend((start + j, tok, i) for j, tok in enumerate(continuation))
        return sorted(rows.values(), key=lambda r: r.tokens)

    def _prefix_states(
        self, groups: list[_Group], soft: list[tuple[torch.Tensor, ...]] | None = None
    ) -> list[list[tuple[torch.Tensor, ...]]]:
        """Per group, per layer: the (keys, values) of its shared prefix, [1, heads, prefix, dim].

        All prefixes run together, packed into as few sequences as possible. With a soft prefix's
        KV `soft`, each prefix runs after it and its state starts with it; a group with no shared
        text prefix gets the soft KV alone.
        """
        todo = [
            _Pack([_Row(g.rows[0].tokens[: g.prefix_len], 0)], 0, k)
            for k, g in enumerate(groups)
            if g.prefix_len
        ]
        states: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in groups]
        # Each prefix is its own group, so packing would not merge them: just sort to cut padding.
        todo.sort(key=lambda p: p.size, reverse=True)
        for batch in _batched(todo, self.max_batch_tokens):
            self._with_backoff(self._prefix_batch, batch, states, soft)
        if soft is not None:
            for k, group in enumerate(groups):
                if not group.prefix_len:
                    states[k] = soft
        return states

    def _prefix_batch(self, batch: list[_Pack], states: list, soft=None) -> None:
        offset = soft[0][0].shape[2] if soft else 0
        packed = _pack(batch, offset, self.tokenizer.pad_token_id, offset=offset)
        cache = _expanded_cache(self.model.config, soft, len(batch)) if soft else None
        cache = self._run(packed, cache, keep_cache=True).past_key_values
        for b, pack in enumerate(batch):
            # A prefix pack holds one row, so it starts at slot 0 after the soft prefix's
            # `offset` slots: its state is the soft prefix's slots followed by its own.
            ((_, end),) = packed.spans[b]
            keep = slice(0, offset + end)
            states[pack.group] = [
                (layer.keys[b : b + 1, :, keep], layer.values[b : b + 1, :, keep])
                for layer in cache.layers
            ]

    def _batches(self, groups: list[_Group]) -> list[list[_Pack]]:
        """Suffixes packed into sequences of about `pack_tokens`, batched under the token budget.

        Packing (several suffixes in one sequence, kept apart by the attention mask) removes
        padding, and batching across groups gives the matrix multiplies long, efficient shapes.
        """
        packs = []
        for k, group in enumerate(groups):
            packs += _fill([_Pack([r], group.prefix_len, k) for r in group.rows], self.pack_tokens)
        return list(_batched(packs, self.max_batch_tokens))

    def _with_backoff(self, step, packs: list[_Pack], *args) -> None:
        """Run `step(packs, *args)`, halving the batch on out-of-memory until one row fails."""
        try:
            step(packs, *args)
        except RuntimeError as err:
            singles = [_Pack([r], p.prefix_len, p.group) for p in packs for r in p.rows]
            if not _is_out_of_memory(err) or len(singles) == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.max_batch_tokens = max(1, self.max_batch_tokens // 2)
            self.pack_tokens = max(1, self.pack_tokens // 2)
            half = len(singles) // 2
            self._with_backoff(step, singles[:half], *args)
            self._with_backoff(step, singles[half:], *args)

    def _forward_batch(
        self,
        packs: list[_Pack],
        prefixes: list[list[tuple[torch.Tensor, ...]]],
        reads: list[tuple[torch.Tensor, torch.Tensor]],
        offset: int = 0,
    ) -> None:
        """Score one batch; append (request index, log-prob) per read token to `reads`."""
        width = offset + max(p.prefix_len for p in packs)
        packed = _pack(packs, width, self.tokenizer.pad_token_id, offset=offset)
        cache = _prefix_cache(self.model.config, packs, prefixes, width) if width else None
        # [packs, width, d_model]
        hidden = self._run(packed, cache, keep_cache=False).last_hidden_state
        device = hidden.device
        selected = hidden[packed.read_pack.to(device), packed.read_offset.to(device)]
        logprobs = self._project(selected).log_softmax(-1)  # [n_reads, vocab]
        targets = packed.read_target.to(device)
        picked = logprobs[torch.arange(len(targets), device=device), targets]
        owner = torch.from_numpy(packed.read_owner).to(device)
        reads.append((owner, picked.double()))

    def _run(self, packed: _PackedBatch, cache, keep_cache: bool):
        """One forward pass of the decoder (no vocabulary head) over a packed batch."""
        device, dtype = self.device, self.model.dtype
        allowed = packed.allowed.to(device)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return self.model.base_model(
            input_ids=packed.ids.to(device),
            position_ids=packed.positions.to(device),
            attention_mask=mask[:, None],  # [packs, 1, query, prefix + query]
            past_key_values=cache,
            use_cache=keep_cache,  # a given cache is read either way
        )

    def _project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states to fp32 vocabulary logits, as the model's own head would."""
        logits = self.model.get_output_embeddings()(hidden).float()
        cap = getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # ---------------------------------------------------------------- generation
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
        stop: Sequence[str] | None = None,
        batch_size: int = 16,
    ) -> list[list[str]]:
        """`n` completions per prompt (greedy when temperature is 0), cut at the first `stop`."""
        if chat:
            prompts = [self.chat_prompt(p) for p in prompts]
        tok = self.tokenizer
        sample = temperature > 0
        out: list[list[str]] = []
        with torch.random.fork_rng(devices=_rng_devices(self.device)):
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                chunk = list(prompts[start : start + batch_size])
                # Left padding: generation continues from the right edge. Passed per call so the
                # shared tokenizer's own setting is left alone.
                enc = tok(
                    chunk,
                    return_tensors="pt",
                    padding=True,
                    padding_side="left",
                    add_special_tokens=False,
                )
                enc = {k: v.to(self.device) for k, v in enc.items()}
                generated = self.model.generate(
                    **enc,
                    do_sample=sample,
                    temperature=temperature if sample else None,
                    top_p=top_p if sample else None,
                    top_k=None,
                    num_return_sequences=n,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tok.pad_token_id,
                    stop_strings=list(stop) if stop else None,
                    tokenizer=tok if stop else None,
                )
                texts = tok.batch_decode(
                    generated[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
                )
                texts = [_cut_at(t, stop) for t in texts]
                out.extend(texts[i : i + n] for i in range(0, len(texts), n))
        return out

    def chat_prompt(self, message: str) -> str:
        """`message` as a user turn in the model's chat template, ready for the reply."""
        if not getattr(self.tokenizer, "chat_template", None):
            return message
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
        )


def _group_rows(rows: list[_Row]) -> list[_Group]:
    """Runs of sorted rows that share a long prefix; leftovers go into prefix-free groups.

    A run grows while the prefix it would lose (for the rows already in it) costs less than what
    the new row gains by sharing.
    """
    groups: list[_Group] = []
    loose: list[_Row] = []
    i = 0
    while i < len(rows):
        shared = rows[i].first_scored
        j = i + 1
        while j < len(rows):
            common = min(_common_prefix(rows[i].tokens, rows[j].tokens), rows[j].first_scored)
            size = j - i
            if common < MIN_SHARED_PREFIX or (size > 1 and size * (shared - common) > common):
                break
            shared = min(shared, common)
            j += 1
        if j - i > 1:
            groups.append(_Group(rows[i:j], shared))
        else:
            loose.append(rows[i])
        i = j
    if loose:
        groups.append(_Group(loose, 0))
    return groups


@dataclass
class _Pack:
    """Rows run side by side in one sequence, all after the KV of group `group`'s prefix."""

    rows: list[_Row]
    prefix_len: int
    group: int

    @property
    def size(self) -> int:
        return sum(len(r.tokens) - self.prefix_len for r in self.rows)


def _fill(items: list[_Pack], capacity: int) -> list[_Pack]:
    """First-fit decreasing: merge one-row packs of one group into packs of up to `capacity`."""
    packs: list[_Pack] = []
    open_by_group: dict[int, list[_Pack]] = {}
    for item in sorted(items, key=lambda p: p.size, reverse=True):
        candidates = open_by_group.setdefault(item.group, [])
        for pack in candidates:
            if pack.size + item.size <= capacity:
                pack.rows += item.rows
                break
        else:
            candidates.append(item)
            packs.append(item)
    return packs


def _batched(packs: list[_Pack], budget: int) -> Iterator[list[_Pack]]:
    """Consecutive packs whose padded size (batch x longest) stays within `budget` tokens."""
    batch: list[_Pack] = []
    longest = 0
    for pack in packs:
        wider = max(longest, pack.size + pack.prefix_len)
        if batch and wider * (len(batch) + 1) > budget:
            yield batch
            batch, wider = [], pack.size + pack.prefix_len
        batch.append(pack)
        longest = wider
    if batch:
        yield batch


@dataclass
class _PackedBatch:
    ids: torch.Tensor  # [packs, width] token ids, right-padded
    positions: torch.Tensor  # [packs, width] position of each token in its own sequence
    allowed: torch.Tensor  # [packs, width, prefix + width] which keys each query may see
    spans: list[list[tuple[int, int]]]  # per pack, per row: where its tokens lie
    read_pack: torch.Tensor  # per read: which pack, at which offset, which target token
    read_offset: torch.Tensor
    read_target: torch.Tensor
    read_owner: np.ndarray  # per read: the request it belongs to


def _pack(packs: list[_Pack], prefix_width: int, pad_id: int, offset: int = 0) -> _PackedBatch:
    """Lay rows side by side; each query sees its pack's prefix and its own row, causally.

    `prefix_width` is the cached prefix length of the batch (the longest of its packs); a pack
    with a shorter prefix sees only the first `offset + pack.prefix_len` cached slots. `offset`
    is the length of a soft prefix before every row's tokens (0: none).
    """
    width = max(p.size for p in packs)
    ids = torch.full((len(packs), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(packs), width), dtype=torch.long)
    segment = torch.full((len(packs), width), -1, dtype=torch.long)
    sees_prefix = torch.zeros((len(packs), width, prefix_width), dtype=torch.bool)
    spans: list[list[tuple[int, int]]] = []
    read_pack, read_offset, read_target, read_owner = [], [], [], []
    for b, pack in enumerate(packs):
        start, p = 0, pack.prefix_len
        spans.append([])
        for k, row in enumerate(pack.rows):
            suffix = row.tokens[p:]
            end = start + len(suffix)
            ids[b, start:end] = torch.tensor(suffix)
            positions[b, start:end] = torch.arange(offset + p, offset + p + len(suffix))
            segment[b, start:end] = k
            sees_prefix[b, start:end, : offset + p] = True
            spans[-1].append((start, end))
            for pos, target, owner in row.reads:
                read_pack.append(b)
                read_offset.append(start + pos - p)
                read_target.append(target)
                read_owner.append(owner)
            start = end
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    # Pads (segment -1) see only each other, which keeps their softmax finite; nothing reads them.
    own_row = (segment[:, :, None] == segment[:, None, :]) & causal
    return _PackedBatch(
        ids,
        positions,
        torch.cat([sees_prefix, own_row], dim=-1),
        spans,
        torch.tensor(read_pack, dtype=torch.long),
        torch.tensor(read_offset, dtype=torch.long),
        torch.tensor(read_target, dtype=torch.long),
        np.array(read_owner, dtype=np.int64),
    )


def _prefix_cache(config, packs: list[_Pack], prefixes, width: int) -> DynamicCache:
    """A KV cache holding each pack's prefix, left-aligned and zero-padded to `width` slots.

    Padded slots are masked out in `_pack`, so their zeros are never attended to.
    """
    cache = DynamicCache(config=config)
    some = next(prefixes[p.group] for p in packs if prefixes[p.group])
    for layer, (k0, _) in enumerate(some):
        keys, values = [], []
        for pack in packs:
            if prefixes[pack.group]:
                k, v = prefixes[pack.group][layer]
            else:
                k = v = k0[:, :, :0]
            pad = (0, 0, 0, width - k.shape[2])
            keys.append(torch.nn.functional.pad(k, pad))
            values.append(torch.nn.functional.pad(v, pad))
        cache.update(torch.cat(keys), torch.cat(values), layer)
    return cache


def _expanded_cache(config, state: list[tuple[torch.Tensor, ...]], batch: int) -> DynamicCache:
    """A KV cache holding one prefix's state (a soft prefix) for each of `batch` rows."""
    cache = DynamicCache(config=config)
    for layer, (keys, values) in enumerate(state):
        cache.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), layer)
    return cache


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for k in range(n):
        if a[k] != b[k]:
            return k
    return n


def _is_out_of_memory(err: RuntimeError) -> bool:
    text = str(err).lower()
    return "out of memory" in text or "can't allocate memory" in text


def _rng_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []


def _cut_at(text: str, stop: Sequence[str] | None) -> str:
    for s in stop or ():
        cut = text.find(s)
        if cut >= 0:
            text = text[:cut]
    return text
