"""Batching packs (ape/packing.py): pure bookkeeping, no model."""

from __future__ import annotations

import random

from ape.packing import MIN_FILL, Pack, Row, batched


def packs_of_sizes(sizes: list[int]) -> list[Pack]:
    return [Pack([Row(tuple(range(size)), 0)], 0, k) for k, size in enumerate(sizes)]


def test_batches_keep_the_budget_and_hold_every_pack_once():
    rng = random.Random(0)
    packs = packs_of_sizes([rng.randint(1, 256) for _ in range(200)])
    batches = list(batched(packs, 1024))
    seen = [id(p) for batch in batches for p in batch]
    assert sorted(seen) == sorted(id(p) for p in packs)
    for batch in batches:
        widest = max(p.size for p in batch)
        assert widest * len(batch) <= 1024 or len(batch) == 1
        assert all(p.size >= MIN_FILL * widest for p in batch)  # little padding in any batch


def test_small_packs_do_not_ride_in_a_wide_batch():
    # Group order puts a few-token pack between wide ones; it waits for packs of its own size.
    batches = list(batched(packs_of_sizes([250, 20, 250, 24, 22]), 4096))
    assert [sorted(p.size for p in batch) for batch in batches] == [[250, 250], [20, 22, 24]]


def test_a_pack_wider_than_the_budget_runs_alone():
    batches = list(batched(packs_of_sizes([300, 10, 300]), 256))
    assert [[p.size for p in batch] for batch in batches] == [[300], [300], [10]]
