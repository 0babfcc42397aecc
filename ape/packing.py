"""Packing scoring requests into batches: pure bookkeeping on token ids, no model.

The scorer (ape/scoring.py) reads log-probs off token sequences. This module decides which
sequences run, which share a prefix, and how they are laid side by side:

- a `Row` is one token sequence fed to the model, plus the (position, target, request) reads off it;
  requests with the same model input share a row;
- a `Group` is a run of sorted rows with a long common prefix, whose KV is computed once;
- a `Pack` is rows of one group laid side by side in one sequence after their group's prefix;
- a `PackedBatch` is the tensors for a batch of packs: ids, positions, and the attention pattern
  that lets each row see its prefix and itself only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

# A shared prefix shorter than this is not worth a separate forward pass.
MIN_SHARED_PREFIX = 4
# A pack narrower than this fraction of its batch's widest starts a new batch: in the wide one it
# would be mostly padding. Rows sharing a short prefix make many small packs (one group each).
MIN_FILL = 0.75
# The target of a read that only asks what the model predicts there (nothing is scored).
NO_TARGET = -1

Pairs = list[tuple[list[int], list[int]]]


@dataclass
class Row:
    """One sequence fed to the model and the (position, target, request) triples read off it."""

    tokens: tuple[int, ...]
    first_scored: int  # the earliest scored position; a shared prefix must end at or before it
    reads: list[tuple[int, int, int]] = field(default_factory=list)


@dataclass
class Group:
    """Rows that share their first `prefix_len` tokens (0: no shared prefix)."""

    rows: list[Row]
    prefix_len: int


@dataclass
class Pack:
    """Rows run side by side in one sequence, all after the KV of group `group`'s prefix."""

    rows: list[Row]
    prefix_len: int
    group: int

    @property
    def size(self) -> int:
        return sum(len(r.tokens) - self.prefix_len for r in self.rows)


@dataclass
class PackedBatch:
    ids: torch.Tensor  # [packs, width] token ids, right-padded
    positions: torch.Tensor  # [packs, width] position of each token in its own sequence
    allowed: torch.Tensor  # [packs, width, prefix + width] which keys each query may see
    spans: list[list[tuple[int, int]]]  # per pack, per row: where its tokens lie
    read_pack: torch.Tensor  # per read: which pack, at which offset, which target token
    read_offset: torch.Tensor
    read_target: torch.Tensor
    read_owner: np.ndarray  # per read: the request it belongs to


def make_rows(pairs: Pairs, max_length: int, offset: int = 0, feed_last: bool = False) -> list[Row]:
    """One row per distinct model input, sorted by tokens so shared prefixes are neighbours.

    `pairs` are (context, continuation) token ids per request; `offset` is the length of a soft
    prefix before every row (it counts against the model's window of `max_length` tokens). With
    `feed_last`, a row that fits also feeds the continuation's last token and reads the position
    after it with target `NO_TARGET` (what the model predicts after the whole continuation).
    """
    rows: dict[tuple[int, ...], Row] = {}
    for i, (context, continuation) in enumerate(pairs):
        whole = context + continuation
        if offset + len(whole) - 1 > max_length:
            raise ValueError(
                f"request {i} is {offset + len(whole)} tokens long, more than the model's "
                f"window of {max_length} tokens; shorten its input or demonstrations"
            )
        # Otherwise the last token is only a target, never an input.
        feed = feed_last and offset + len(whole) <= max_length
        tokens = tuple(whole if feed else whole[:-1])
        start = len(context) - 1
        row = rows.get(tokens)
        if row is None:
            row = rows[tokens] = Row(tokens, first_scored=start)
        row.first_scored = min(row.first_scored, start)
        row.reads.extend((start + j, tok, i) for j, tok in enumerate(continuation))
        if feed:
            row.reads.append((len(whole) - 1, NO_TARGET, i))
    return sorted(rows.values(), key=lambda r: r.tokens)


def group_rows(rows: list[Row]) -> list[Group]:
    """Runs of sorted rows that share a long prefix; leftovers go into prefix-free groups.

    A run grows while the prefix it would lose (for the rows already in it) costs less than what
    the new row gains by sharing.
    """
    groups: list[Group] = []
    loose: list[Row] = []
    i = 0
    while i < len(rows):
        shared = rows[i].first_scored
        j = i + 1
        while j < len(rows):
            common = min(common_prefix(rows[i].tokens, rows[j].tokens), rows[j].first_scored)
            size = j - i
            if common < MIN_SHARED_PREFIX or (size > 1 and size * (shared - common) > common):
                break
            shared = min(shared, common)
            j += 1
        if j - i > 1:
            groups.append(Group(rows[i:j], shared))
        else:
            loose.append(rows[i])
        i = j
    if loose:
        groups.append(Group(loose, 0))
    return groups


def prefix_packs(groups: list[Group]) -> list[Pack]:
    """One pack per group with a shared prefix, holding that prefix alone (each prefix is its own
    group, so packing would not merge them; `batched` orders them by width)."""
    return [
        Pack([Row(g.rows[0].tokens[: g.prefix_len], 0)], 0, k)
        for k, g in enumerate(groups)
        if g.prefix_len
    ]


def suffix_packs(groups: list[Group], pack_tokens: int) -> list[Pack]:
    """Every group's suffixes, packed into sequences of about `pack_tokens`.

    Packing (several suffixes in one sequence, kept apart by the attention mask) removes padding.
    """
    packs: list[Pack] = []
    for k, group in enumerate(groups):
        packs += fill([Pack([r], group.prefix_len, k) for r in group.rows], pack_tokens)
    return packs


def singles(packs: list[Pack]) -> list[Pack]:
    """The same rows, one per pack (what an out-of-memory back-off splits)."""
    return [Pack([r], p.prefix_len, p.group) for p in packs for r in p.rows]


def fill(items: list[Pack], capacity: int) -> list[Pack]:
    """First-fit decreasing: merge one-row packs of one group into packs of up to `capacity`."""
    packs: list[Pack] = []
    open_by_group: dict[int, list[Pack]] = {}
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


def batched(packs: list[Pack], budget: int) -> Iterator[list[Pack]]:
    """The packs, widest first, in batches whose padded size (batch x widest) stays within
    `budget` tokens and whose packs are each at least `MIN_FILL` of the batch's widest."""
    batch: list[Pack] = []
    longest = 0
    for one in sorted(packs, key=lambda p: p.size + p.prefix_len, reverse=True):
        size = one.size + one.prefix_len
        if batch and (longest * (len(batch) + 1) > budget or size < MIN_FILL * longest):
            yield batch
            batch = []
        if not batch:
            longest = size
        batch.append(one)
    if batch:
        yield batch


def pack(packs: list[Pack], prefix_width: int, pad_id: int, offset: int = 0) -> PackedBatch:
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
    for b, one in enumerate(packs):
        start, p = 0, one.prefix_len
        spans.append([])
        for k, row in enumerate(one.rows):
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
    return PackedBatch(
        ids,
        positions,
        torch.cat([sees_prefix, own_row], dim=-1),
        spans,
        torch.tensor(read_pack, dtype=torch.long),
        torch.tensor(read_offset, dtype=torch.long),
        torch.tensor(read_target, dtype=torch.long),
        np.array(read_owner, dtype=np.int64),
    )


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for k in range(n):
        if a[k] != b[k]:
            return k
    return n
