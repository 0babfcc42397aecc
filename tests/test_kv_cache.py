"""The reserved decoding cache (ape/kv_cache.py) against plain concatenation."""

from __future__ import annotations

import pytest
import torch

import ape.kv_cache as kv_cache

pytestmark = pytest.mark.skipif(
    kv_cache.DynamicLayer is None, reason="this transformers has no per-layer cache objects"
)


def states(rows: int, length: int, layers: int = 2) -> kv_cache.LayerStates:
    shape = (rows, 2, length, 4)
    return [(torch.randn(shape), torch.randn(shape)) for _ in range(layers)]


def test_a_reserved_cache_writes_in_place_then_grows_like_a_concatenating_one(tiny_lm):
    torch.manual_seed(0)
    start = states(3, 5)
    cache = kv_cache.reserved_cache(tiny_lm.model.config, start, room=2)
    expected = [list(layer) for layer in start]
    buffers = [layer.key_buffer.data_ptr() for layer in cache.layers]
    for step in range(4):  # two steps fit the room, the next two concatenate
        new = states(3, 1)
        for i, (k, v) in enumerate(new):
            cache.update(k, v, i)
            expected[i] = [torch.cat([expected[i][0], k], 2), torch.cat([expected[i][1], v], 2)]
        in_place = [layer.keys.data_ptr() for layer in cache.layers] == buffers
        assert in_place == (step < 2)
        assert kv_cache.reserved_room(cache) == max(0, 1 - step)
    for (k, v), (ek, ev) in zip(kv_cache.layer_states(cache), expected, strict=True):
        assert torch.equal(k, ek) and torch.equal(v, ev)


def test_keeping_rows_compacts_in_place_and_selecting_others_copies(tiny_lm):
    torch.manual_seed(1)
    start = states(4, 3)
    cache = kv_cache.reserved_cache(tiny_lm.model.config, start, room=3)
    # Row 1 leaves: the last row moves into its slot, the others stay where they are.
    order = kv_cache.fill_order([0, 2, 3], 4)
    assert order == [0, 3, 2]
    moved = kv_cache.select_rows(tiny_lm.model.config, cache, torch.tensor([0, 2, 3]))
    assert moved is not cache  # not a fill order: a copy
    kept = kv_cache.select_rows(tiny_lm.model.config, cache, torch.tensor(order))
    assert kept is cache and kv_cache.reserved_room(kept) == 3
    k, _ = kv_cache.layer_states(kept)[1]
    assert torch.equal(k, start[1][0][order])
    assert torch.equal(kv_cache.layer_states(moved)[1][0], start[1][0][[0, 2, 3]])
    new = torch.randn(3, 2, 1, 4)
    for layer in range(2):  # still written in place, after the kept rows
        kept.update(new, new, layer)
    assert torch.equal(kv_cache.layer_states(kept)[1][0][:, :, 3:], new)
    repeated = kv_cache.select_rows(tiny_lm.model.config, kept, torch.tensor([1, 1]))
    assert repeated is not kept and kv_cache.reserved_room(repeated) == 2
    assert torch.equal(kv_cache.layer_states(repeated)[0][1][0, :, :3], start[0][1][3])


def test_merging_packs_each_rows_valid_slots_left_and_reserves_room(tiny_lm):
    torch.manual_seed(2)
    config = tiny_lm.model.config
    a, b = states(2, 4), states(1, 6)
    valid_a = torch.tensor([[True, False, True, True], [False, True, False, False]])
    valid_b = torch.tensor([[True, True, False, True, True, False]])
    parts = [
        (kv_cache.reserved_cache(config, a, room=0), valid_a),
        (kv_cache.build_cache(config, b), valid_b),
    ]
    cache, valid = kv_cache.merge(config, parts, room=2)
    assert valid.tolist() == [[True] * 3 + [False], [True] + [False] * 3, [True] * 4]
    assert kv_cache.reserved_room(cache) == 2 and kv_cache.truncatable(cache)
    for (k, v), (ka, va), (kb, vb) in zip(kv_cache.layer_states(cache), a, b, strict=True):
        assert torch.equal(k[0, :, :3], ka[0, :, [0, 2, 3]])
        assert torch.equal(v[1, :, :1], va[1, :, [1]])  # its other slots are masked
        assert torch.equal(k[2], kb[0, :, [0, 1, 3, 4]]) and torch.equal(
            v[2], vb[0, :, [0, 1, 3, 4]]
        )


def test_a_selection_of_a_reserved_cache_with_no_room_left_can_still_be_truncated(tiny_lm):
    config = tiny_lm.model.config
    full = kv_cache.reserved_cache(config, states(3, 2), room=0)
    picked = kv_cache.select_rows(config, full, torch.tensor([2, 0]))
    assert kv_cache.truncatable(picked)
    kv_cache.truncate(picked, 1)
    assert kv_cache.layer_states(picked)[0][0].shape[2] == 1
