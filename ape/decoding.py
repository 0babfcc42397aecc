"""The decoding loop of ape/shared_generation.py: rows pick tokens until each is done.

A row is done at EOS, at the token cap, or when its text contains a stop string or matches a
stop pattern; done rows leave the batch (the cache is compacted) and the loop ends when none is
left. With `Sampling.lookup`, a row whose last tokens occurred earlier in its text gets a draft
of what followed there (ape/prompt_lookup.py); one pass checks the drafts of all rows, and each
row keeps the drafted tokens it would have picked one at a time, then the token it picks after
them. The texts are those of plain decoding (up to float rounding of the logits): a draft only
decides how many tokens one pass may settle.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

import ape.kv_cache as kv_cache
from ape.next_token import choose
from ape.prompt_lookup import draft
from ape.vocab_head import logits_of

# A stop is a string (the text is cut before it) or a compiled pattern (cut at its match).
Stop = str | re.Pattern


@dataclass(frozen=True)
class Sampling:
    """How rows pick their next token. temperature 0 is greedy (top_p is then unused).

    `lookup` is the longest draft a row gets from its own text per pass (0: no drafts).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    max_new_tokens: int = 32
    eos: frozenset[int] = frozenset()
    stop: tuple[Stop, ...] = ()
    lookup: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def first_stop(text: str, stop: Sequence[Stop]) -> int:
    """Where `text` is cut: the start of its earliest stop string or pattern match, or -1."""
    cut = -1
    for s in stop:
        if isinstance(s, str):
            at = text.find(s)
        else:
            match = s.search(text)
            at = match.start() if match else -1
        if at >= 0 and (cut < 0 or at < cut):
            cut = at
    return cut


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean [batch, query, key] pattern as the additive [batch, 1, query, key] mask."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


@dataclass
class Decoding:
    """The live rows of one batch: their cache and what the next step needs."""

    cache: object  # a DynamicCache, built and read through ape/kv_cache.py
    valid: torch.Tensor  # [rows, cache slots] bool: the slots each row attends to
    position: torch.Tensor  # [rows] the position of each row's next input token
    logits: torch.Tensor  # [rows, vocab] fp32: each row's next-token logits
    rows: torch.Tensor  # [rows] each live row's index in the batch's row list

    def select(self, model, keep: torch.Tensor, room: int | None = None) -> Decoding:
        """The rows at `keep` (indices into the live rows, repeats allowed), with room in the
        cache for `room` more tokens (None: what it has left)."""
        return Decoding(
            kv_cache.select_rows(model.config, self.cache, keep, room),
            self.valid[keep],
            self.position[keep],
            self.logits[keep],
            self.rows[keep],
        )

    def merge(self, model, other: Decoding, room: int) -> Decoding:
        """These rows, then `other`'s, in one batch with room in the cache for `room` more
        tokens; each row's cache keeps only its valid slots (see kv_cache.merge)."""
        parts = [(self.cache, self.valid), (other.cache, other.valid)]
        cache, valid = kv_cache.merge(model.config, parts, room)
        return Decoding(
            cache,
            valid,
            torch.cat([self.position, other.position]),
            torch.cat([self.logits, other.logits]),
            torch.cat([self.rows, other.rows]),
        )


# Tops a batch up with rows still waiting (None: no batch yet); returns None when none is left.
TopUp = Callable[[Decoding | None], Decoding | None]


def feed(model, state: Decoding, ids: torch.Tensor, fed: torch.Tensor) -> torch.Tensor:
    """Feed `ids` [rows, width] after each row's cache; `fed` [rows, width] marks the real ones
    (a row's real tokens come first). Returns the logits after every position, [rows, width,
    vocab]; the cache and `valid` gain `width` slots, and positions advance by `width`."""
    width = ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=ids.device).tril()
    # Padding sees itself, which keeps its softmax finite; nothing reads it.
    own = (fed[:, None, :] & causal) | torch.eye(width, dtype=torch.bool, device=ids.device)
    allowed = torch.cat([state.valid[:, None, :].expand(-1, width, -1), own], dim=-1)
    out, state.cache = kv_cache.run(
        model.base_model,
        cache=state.cache,
        input_ids=ids,
        position_ids=state.position[:, None] + torch.arange(width, device=ids.device),
        attention_mask=additive_mask(allowed, model.dtype),
        use_cache=True,
    )
    state.valid = torch.cat([state.valid, fed], dim=1)
    state.position = state.position + width
    return logits_of(model, out.last_hidden_state)


def step(model, state: Decoding, tokens: torch.Tensor) -> None:
    """Feed one token per live row; `state` then holds the logits for the token after it."""
    fed = torch.ones(len(tokens), 1, dtype=torch.bool, device=tokens.device)
    state.logits = feed(model, state, tokens[:, None], fed)[:, -1]


def check_drafts(
    model,
    state: Decoding,
    picked: torch.Tensor,
    drafts: list[list[int]],
    picks: list[int],
    sampling: Sampling,
    u: torch.Tensor | None,
) -> list[int]:
    """Feed each row's picked token and its draft in one pass; per row, how many drafted tokens
    it would have picked itself (`picks`: per row, the new-token index of its first drafted
    token, which indexes its draws).

    Afterwards `state` is as if each row had been fed its picked token and those drafted
    tokens one at a time: the other slots are hidden and cut where no row reaches.
    """
    rows, width = len(drafts), 1 + max(len(d) for d in drafts)
    device = picked.device
    ids = torch.zeros(rows, width, dtype=torch.long)
    fed = torch.zeros(rows, width, dtype=torch.bool)
    for b, tokens in enumerate(drafts):
        ids[b, 1 : 1 + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        fed[b, : 1 + len(tokens)] = True
    ids, fed = ids.to(device), fed.to(device)
    ids[:, 0] = picked
    start = len(state.valid[0])
    position = state.position
    logits = feed(model, state, ids, fed)
    draws = None
    if u is not None:  # a drafted token at new-token index t is checked with the draw for t
        at = torch.tensor(picks, device=device)[:, None] + torch.arange(width, device=device)
        draws = u.gather(1, at.clamp(max=u.shape[1] - 1)).flatten()
    chosen = choose(logits.flatten(0, 1), draws, sampling.temperature, sampling.top_p)
    agree = (chosen.view(rows, width)[:, :-1] == ids[:, 1:]) & fed[:, 1:]
    kept = agree.int().cumprod(dim=1).sum(dim=1)  # the leading agreements
    reach = 1 + int(kept.max())
    columns = torch.arange(width, device=device)
    state.valid = torch.cat(
        [state.valid[:, :start], fed[:, :reach] & (columns[:reach] <= kept[:, None])], dim=1
    )
    kv_cache.truncate(state.cache, start + reach)
    state.position = position + 1 + kept
    state.logits = logits[torch.arange(rows, device=device), kept]
    return kept.tolist()


def decode(
    model,
    tokenizer,
    state: Decoding | None,
    sampling: Sampling,
    u: torch.Tensor | None,
    prompts: Sequence[Sequence[int]],
    top_up: TopUp | None = None,
) -> list[list[int]]:
    """Decode every row until it is done; per row, its new tokens (EOS left out).

    `prompts` holds every row's prompt tokens (where drafts are looked up), indexed as the rows
    of `state` and of the batches `top_up` brings: before each pass it may add waiting rows
    to the batch, so that passes keep enough rows to use the hardware while rows leave.
    """
    out: list[list[int]] = [[] for _ in range(len(prompts))]
    while True:
        if top_up is not None:
            state = top_up(state)
        if state is None:
            return out
        lookup = sampling.lookup if kv_cache.truncatable(state.cache) else 0
        rows = state.rows.tolist()
        draws = None
        if u is not None:
            at = torch.tensor([len(out[r]) for r in rows], device=u.device)
            draws = u[state.rows, at]
        picked = choose(state.logits, draws, sampling.temperature, sampling.top_p)
        done = finished(tokenizer, out, rows, picked.tolist(), sampling)
        state, picked = leave(model, state, done, picked)
        if state is None:
            continue
        rows = state.rows.tolist()
        drafts = (
            [
                draft(
                    [*prompts[r], *out[r]],
                    len(out[r]),
                    min(lookup, sampling.max_new_tokens - len(out[r]) - 1),
                )
                for r in rows
            ]
            if lookup
            else []
        )
        if not any(drafts):
            step(model, state, picked)
            continue
        picks = [len(out[r]) for r in rows]  # the index of the token after the picked one
        kept = check_drafts(model, state, picked, drafts, picks, sampling, u)
        done = [False] * len(rows)
        for j in range(max(kept)):  # the kept drafted tokens, in order, as if picked
            live = [b for b in range(len(rows)) if kept[b] > j and not done[b]]
            ends = finished(
                tokenizer, out, [rows[b] for b in live], [drafts[b][j] for b in live], sampling
            )
            for b, end in zip(live, ends, strict=True):
                done[b] = end
        state, _ = leave(model, state, done, picked)


def leave(
    model, state: Decoding, done: list[bool], picked: torch.Tensor
) -> tuple[Decoding | None, torch.Tensor]:
    """Done rows leave the batch (no later pass computes them); None when no row is left."""
    live = [b for b, d in enumerate(done) if not d]
    if not live:
        return None, picked
    if len(live) == len(done):
        return state, picked
    keep = torch.tensor(kv_cache.fill_order(live, len(done)), device=picked.device)
    return state.select(model, keep), picked[keep]


def finished(
    tokenizer, out: list[list[int]], rows: list[int], picked: list[int], sampling: Sampling
) -> list[bool]:
    """Append each live row's token to `out`; per live row, whether it is now done."""
    done = []
    for row, token in zip(rows, picked, strict=True):
        if token in sampling.eos:
            done.append(True)
            continue
        out[row].append(token)
        done.append(len(out[row]) >= sampling.max_new_tokens)
    if sampling.stop:
        check = [b for b, d in enumerate(done) if not d]
        texts = tokenizer.batch_decode([out[rows[b]] for b in check], skip_special_tokens=True)
        for b, text in zip(check, texts, strict=True):
            done[b] = first_stop(text, sampling.stop) >= 0
    return done
