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
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch

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
        for ctx, whole in zip(enc[: len(requests)], enc[len(requests) :], strict=True):
            cut = len(ctx)
            context_ids, continuation_ids = whole[:cut], whole[cut:]
            if not context_ids:
                context_ids = [self.prefix_token_id]
            pairs.append((context_ids, continuation_ids))
        return pairs

    # ---------------------------------------------------------------- scoring
    @torch.inference_mode()
    def loglikelihood(
        self, requests: Sequence[Request], *, return_counts: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Summed log-prob of each continuation given its context, in request order.

        With `return_counts`, also the continuation token counts (for the per-token mean).
        """
        pairs = self.encode_pairs(requests)
        sums = np.zeros(len(pairs), dtype=np.float64)
        counts = np.array([len(cont) for _, cont in pairs], dtype=np.int64)
        rows = self._rows(pairs)
        for group in _group_rows(rows):
            for batch in self._batches(group):
                self._score_batch(batch, group.prefix_len, sums)
        return (sums, counts) if return_counts else sums

    def _rows(self, pairs: list[tuple[list[int], list[int]]]) -> list[_Row]:
        rows: dict[tuple[int, ...], _Row] = {}
        for i, (context, continuation) in enumerate(pairs):
            whole = context + continuation
            if len(whole) - 1 > self.max_length:
                raise ValueError(
                    f"request {i} is {len(whole)} tokens long, more than the model's window of "
                    f"{self.max_length} tokens; shorten its input or demonstrations"
                )
            tokens = tuple(whole[:-1])  # the last token is only a target, never an input
            start = len(context) - 1
            row = rows.get(tokens)
            if row is None:
                row = rows[tokens] = _Row(tokens, first_scored=start)
            row.first_scored = min(row.first_scored, start)
            row.reads.extend((start + j, tok, i) for j, tok in enumerate(continuation))
        return sorted(rows.values(), key=lambda r: r.tokens)

    def _batches(self, group: _Group) -> Iterator[list[list[_Row]]]:
        """Pack suffixes into sequences of about `pack_tokens`, then batch packs under the budget.

        Packing (several suffixes in one sequence, kept apart by the attention mask) removes
        padding and gives the matrix multiplies long, efficient shapes.
        """
        rows = sorted(group.rows, key=lambda r: len(r.tokens), reverse=True)
        packs: list[list[_Row]] = []
        filled: list[int] = []
        for row in rows:  # first-fit decreasing
            size = len(row.tokens) - group.prefix_len
            for k, used in enumerate(filled):
                if used + size <= self.pack_tokens:
                    packs[k].append(row)
                    filled[k] += size
                    break
            else:
                packs.append([row])
                filled.append(size)
        per_batch = max(1, self.max_batch_tokens // max(max(filled), 1))
        for start in range(0, len(packs), per_batch):
            yield packs[start : start + per_batch]

    def _score_batch(self, packs: list[list[_Row]], prefix_len: int, sums: np.ndarray) -> None:
        """Score one batch, halving it on out-of-memory until a single row fails."""
        try:
            self._forward_batch(packs, prefix_len, sums)
        except RuntimeError as err:
            rows = [row for pack in packs for row in pack]
            if not _is_out_of_memory(err) or len(rows) == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.max_batch_tokens = max(1, self.max_batch_tokens // 2)
            self.pack_tokens = max(1, self.pack_tokens // 2)
            half = len(rows) // 2
            self._score_batch([[r] for r in rows[:half]], prefix_len, sums)
            self._score_batch([[r] for r in rows[half:]], prefix_len, sums)

    def _forward_batch(self, packs: list[list[_Row]], prefix_len: int, sums: np.ndarray) -> None:
        device = self.device
        base = self.model.base_model
        batch = _pack(packs, prefix_len, self.tokenizer.pad_token_id)
        cache = None
        if prefix_len:
            prefix = torch.tensor([packs[0][0].tokens[:prefix_len]], device=device)
            cache = base(input_ids=prefix, use_cache=True).past_key_values
            _expand_cache(cache, len(packs))
        dtype = self.model.dtype
        mask = torch.zeros(batch.allowed.shape, dtype=dtype)
        mask.masked_fill_(~batch.allowed, torch.finfo(dtype).min)
        hidden = base(
            input_ids=batch.ids.to(device),
            position_ids=batch.positions.to(device),
            attention_mask=mask[:, None].to(device),  # [packs, 1, query, prefix + query]
            past_key_values=cache,
            use_cache=cache is not None,
        ).last_hidden_state  # [packs, width, d_model]
        selected = hidden[batch.read_pack.to(device), batch.read_offset.to(device)]
        logprobs = self._project(selected).log_softmax(-1)  # [n_reads, vocab]
        targets = batch.read_target.to(device)
        picked = logprobs[torch.arange(len(targets), device=device), targets]
        np.add.at(sums, batch.read_owner, picked.double().cpu().numpy())

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
        tok.padding_side = "left"  # generation continues from the right edge
        sample = temperature > 0
        out: list[list[str]] = []
        with torch.random.fork_rng(devices=_rng_devices(self.device)):
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                chunk = list(prompts[start : start + batch_size])
                enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
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
class _PackedBatch:
    ids: torch.Tensor  # [packs, width] token ids, right-padded
    positions: torch.Tensor  # [packs, width] position of each token in its own sequence
    allowed: torch.Tensor  # [packs, width, prefix + width] which keys each query may see
    read_pack: torch.Tensor  # per read: which pack, at which offset, which target token
    read_offset: torch.Tensor
    read_target: torch.Tensor
    read_owner: np.ndarray  # per read: the request it belongs to


def _pack(packs: list[list[_Row]], prefix_len: int, pad_id: int) -> _PackedBatch:
    """Lay suffixes side by side; each query sees the shared prefix and its own suffix, causally."""
    width = max(sum(len(r.tokens) - prefix_len for r in pack) for pack in packs)
    ids = torch.full((len(packs), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(packs), width), dtype=torch.long)
    segment = torch.full((len(packs), width), -1, dtype=torch.long)
    read_pack, read_offset, read_target, read_owner = [], [], [], []
    for b, pack in enumerate(packs):
        start = 0
        for k, row in enumerate(pack):
            suffix = row.tokens[prefix_len:]
            end = start + len(suffix)
            ids[b, start:end] = torch.tensor(suffix)
            positions[b, start:end] = torch.arange(prefix_len, prefix_len + len(suffix))
            segment[b, start:end] = k
            for pos, target, owner in row.reads:
                read_pack.append(b)
                read_offset.append(start + pos - prefix_len)
                read_target.append(target)
                read_owner.append(owner)
            start = end
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = segment[:, :, None] == segment[:, None, :]
    # Pads (segment -1) see only each other, which keeps their softmax finite; nothing reads them.
    allowed = torch.cat(
        [
            (segment >= 0)[:, :, None].expand(-1, -1, prefix_len),
            same & causal,
        ],
        dim=-1,
    )
    return _PackedBatch(
        ids,
        positions,
        allowed,
        torch.tensor(read_pack),
        torch.tensor(read_offset),
        torch.tensor(read_target),
        np.array(read_owner),
    )


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for k in range(n):
        if a[k] != b[k]:
            return k
    return n


def _expand_cache(cache, batch: int) -> None:
    """Broadcast a batch-1 KV cache over `batch` rows without copying (views)."""
    for layer in cache.layers:
        layer.keys = layer.keys.expand(batch, *layer.keys.shape[1:])
        layer.values = layer.values.expand(batch, *layer.values.shape[1:])


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
