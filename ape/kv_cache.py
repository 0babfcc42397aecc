"""Every call whose form depends on the installed transformers version, behind one small API.

Transformers renamed the KV-cache argument of a model's forward from `past_key_values` to
`cache` (and the output field with it) in the 5.x releases. Before, an unknown `cache=` keyword
is swallowed by the forward's `**kwargs` and the cache silently ignored: the continuation is then
scored without its context, with no error. So nothing outside this module passes a cache or
reads one back; `run` picks the argument the model's own forward signature declares.

The cache container changed too: 4.x before 4.54 holds per-layer lists reached by `cache[i]`,
later releases hold `cache.layers[i].keys / .values`, and only later ones take `config=`.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Iterable, Sequence

import torch
from transformers import DynamicCache

try:  # caches built from per-layer objects; before them, a cache can only concatenate
    from transformers.cache_utils import Cache, DynamicLayer
except ImportError:  # pragma: no cover - older transformers
    Cache = DynamicLayer = None
if Cache is not None and "layers" not in inspect.signature(Cache.__init__).parameters:
    Cache = DynamicLayer = None  # pragma: no cover - layer objects, but no Cache(layers=...)

# Per layer, the (keys, values) of a prefix: [batch, heads, tokens, head_dim] each.
LayerStates = list[tuple[torch.Tensor, torch.Tensor]]
# (layers, kv_heads, head_dim): the shape of a model's cache, and so of a key/value prefix.
KVShape = tuple[int, int, int]
_SHAPES: weakref.WeakKeyDictionary[torch.nn.Module, KVShape] = weakref.WeakKeyDictionary()


@functools.cache
def _argument_for(forward_type: type) -> str:
    params = inspect.signature(forward_type.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise TypeError(f"{forward_type.__name__}.forward takes no KV cache argument")


def cache_argument(module: torch.nn.Module) -> str:
    """The keyword `module`'s forward takes its KV cache by: 'cache' or 'past_key_values'."""
    return _argument_for(type(module))


def run(module: torch.nn.Module, *, cache: DynamicCache | None = None, **inputs):
    """`module(**inputs)` reading `cache`; returns (the output, the cache it carries or None).

    Pass `use_cache=True` in `inputs` to get a cache back; a given cache is read either way.
    """
    name = cache_argument(module)
    out = module(**inputs, **{name: cache})
    # The output field has the argument's name; asking a 5.x output for the old name logs a
    # deprecation warning, so only the installed version's name is read.
    return out, out.get(name)


def layer_states(cache) -> LayerStates:
    """Per layer, the (keys, values) a cache holds."""
    layers = getattr(cache, "layers", None)
    if layers is None:  # transformers before 4.54: the cache indexes as (keys, values) per layer
        return [tuple(cache[i]) for i in range(len(cache))]
    return [(layer.keys, layer.values) for layer in layers]


def build_cache(config, states: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A DynamicCache holding `states` (per layer (keys, values)), laid out as `config` says."""
    cache = DynamicCache(config=config) if _takes_config() else DynamicCache()
    for layer, (keys, values) in enumerate(states):
        cache.update(keys, values, layer)
    return cache


def expanded_cache(config, state: LayerStates, batch: int) -> DynamicCache:
    """A cache holding one prefix's state ([1, ...] per layer) for each of `batch` rows."""
    return build_cache(
        config, [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in state]
    )


def padded_cache(
    config, states: Sequence[LayerStates | None], width: int, room: int = 0
) -> DynamicCache:
    """A cache holding one prefix state per batch row, left-aligned and zero-padded to `width`,
    with `room` more tokens reserved (see `reserved_cache`).

    A row without a prefix (None) gets `width` zero slots. The caller's attention mask must hide
    the padded slots: their zeros are never to be attended to.
    """
    some = next(s for s in states if s)
    room = room if DynamicLayer is not None else 0
    layers = []
    for layer, (k0, v0) in enumerate(some):
        none = (k0[:, :, :0], v0[:, :, :0])  # a row without a prefix: no slots of its own
        layers.append(_stacked_rows([s[layer] if s else none for s in states], width, room))
    if room:
        return Cache(layers=[ReservedLayer(k, v, width) for k, v in layers])
    return build_cache(config, layers)


def reserved_cache(
    config, states: Iterable[tuple[torch.Tensor, torch.Tensor]], room: int
) -> DynamicCache:
    """A cache holding `states` with room for `room` more tokens per row, written in place.

    A decoding loop's DynamicCache concatenates every step, copying the whole KV once per token
    (a quarter of the time of decoding long prompts on a CPU, and the allocator churn behind
    its peak memory). `states` may be a generator: each layer is copied in as it comes, so a
    selection never holds a second copy of the whole KV. Transformers whose Cache is not built
    from layer objects get a DynamicCache.
    """
    if DynamicLayer is None:
        return build_cache(config, list(states))
    return Cache(layers=[ReservedLayer.holding(k, v, room) for k, v in states])


if DynamicLayer is not None:

    class ReservedLayer(DynamicLayer):
        """A DynamicLayer whose keys and values sit at the start of a longer buffer: an update
        that fits writes into it in place; one that does not grows by concatenation."""

        def __init__(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, length: int):
            """Buffers of [rows, heads, capacity, dim] whose first `length` slots are filled."""
            super().__init__()
            self.key_buffer, self.value_buffer = key_buffer, value_buffer
            self.keys = key_buffer[:, :, :length]
            self.values = value_buffer[:, :, :length]
            self.device = key_buffer.device
            self.is_initialized = True

        @classmethod
        def holding(cls, keys: torch.Tensor, values: torch.Tensor, room: int) -> ReservedLayer:
            """A layer holding copies of `keys` and `values`, with room for `room` more slots."""
            rows, heads, length, dim = keys.shape
            key_buffer = keys.new_empty(rows, heads, length + room, dim)
            value_buffer = values.new_empty(rows, heads, length + room, values.shape[3])
            key_buffer[:, :, :length] = keys
            value_buffer[:, :, :length] = values
            return cls(key_buffer, value_buffer, length)

        @property
        def room(self) -> int:
            """Tokens an update can still write in place (0 once it has concatenated)."""
            if self.keys.data_ptr() != self.key_buffer.data_ptr():
                return 0
            return self.key_buffer.shape[2] - self.keys.shape[2]

        def keep(self, rows: torch.Tensor) -> None:
            """Keep the batch rows `rows`, a `fill_order`: only the rows that move are copied."""
            length = self.keys.shape[2]
            slots = torch.arange(len(rows), device=rows.device)
            moved = slots[rows != slots]
            if len(moved):
                self.key_buffer[moved, :, :length] = self.keys[rows[moved]]
                self.value_buffer[moved, :, :length] = self.values[rows[moved]]
            self.key_buffer = self.key_buffer[: len(rows)]
            self.value_buffer = self.value_buffer[: len(rows)]
            self.keys = self.key_buffer[:, :, :length]
            self.values = self.value_buffer[:, :, :length]

        def truncate(self, length: int) -> None:
            """Forget every slot from `length` on (they are written over by later updates)."""
            self.keys = self.keys[:, :, :length]
            self.values = self.values[:, :, :length]

        def update(self, key_states, value_states, *args, **kwargs):
            start = self.keys.shape[2]
            end = start + key_states.shape[2]
            if end - start > self.room:
                return super().update(key_states, value_states, *args, **kwargs)
            self.key_buffer[:, :, start:end] = key_states
            self.value_buffer[:, :, start:end] = value_states
            self.keys = self.key_buffer[:, :, :end]
            self.values = self.value_buffer[:, :, :end]
            return self.keys, self.values


@functools.cache
def _takes_config() -> bool:
    # DynamicCache(config=...) sets up per-layer types (sliding windows); 4.48 has no such argument.
    return "config" in inspect.signature(DynamicCache.__init__).parameters


def select_rows(config, cache, rows: torch.Tensor, room: int | None = None) -> DynamicCache:
    """A cache holding the batch rows `rows` of `cache`, in that order (repeats allowed), with
    `room` more tokens reserved (None: the room `cache` has left)."""
    if room is None and reserved_room(cache) and filling(rows, cache.layers[0].keys.shape[0]):
        for layer in cache.layers:  # finished rows leave; rows from the end fill their slots
            layer.keep(rows)
        return cache
    # A reserved cache stays one with no room left: decoding with drafts truncates it.
    keep_reserved = room or truncatable(cache)
    room = reserved_room(cache) if room is None else room
    selected = ((k.index_select(0, rows), v.index_select(0, rows)) for k, v in layer_states(cache))
    if keep_reserved:
        return reserved_cache(config, selected, room)
    return build_cache(config, list(selected))


def merge(
    config, parts: Sequence[tuple[object, torch.Tensor]], room: int
) -> tuple[DynamicCache, torch.Tensor]:
    """One cache holding the rows of every (cache, valid) of `parts`, in order, and its valid
    slots ([rows, slots] bool), with `room` more tokens reserved. The parts' caches are
    emptied: they are not to be used again.

    Each row keeps only its valid slots, packed to the left in their order. Positions are held
    by the keys themselves (rotary embeddings are applied before caching), and attention sums
    over the slots a mask allows, so where a slot sits changes nothing but float rounding.
    """
    counts = torch.cat([valid.sum(dim=1) for _, valid in parts])
    width = int(counts.max())
    # Per part, each row's valid slots first, in slot order (a stable sort of "not valid").
    orders = [
        torch.sort((~valid).int(), dim=1, stable=True).indices[:, :width] for _, valid in parts
    ]
    # Each part's layers are let go of as they are copied (the parts are dead after a merge),
    # so the merge holds one layer twice, not the whole KV.
    states = [layer_states(cache) for cache, _ in parts]
    merged = []
    for layer in range(len(states[0])):
        pieces = []
        for (cache, _), held, order in zip(parts, states, orders, strict=True):
            keys, values = held[layer]
            held[layer] = None
            if getattr(cache, "layers", None) is not None:
                cache.layers[layer] = None
            at = order[:, None, :, None]
            pieces.append(
                (
                    keys.gather(2, at.expand(-1, keys.shape[1], -1, keys.shape[3])),
                    values.gather(2, at.expand(-1, values.shape[1], -1, values.shape[3])),
                )
            )
            del keys, values
        merged.append(_stacked_rows(pieces, width, room))
    slots = torch.arange(width, device=counts.device)
    valid = slots[None, :] < counts[:, None]
    if DynamicLayer is None or not room:
        return build_cache(config, [(k[:, :, :width], v[:, :, :width]) for k, v in merged]), valid
    return Cache(layers=[ReservedLayer(k, v, width) for k, v in merged]), valid


def _stacked_rows(
    pieces: Sequence[tuple[torch.Tensor, torch.Tensor]], width: int, room: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) pieces of [rows, heads, at most `width`, dim], stacked by rows into
    buffers of `width` + `room` slots. The first `width` are zero where no piece reaches (a
    masked slot must hold no NaN); the room is written before it is read."""
    k0, v0 = pieces[0]
    rows = sum(k.shape[0] for k, _ in pieces)
    keys = k0.new_empty(rows, k0.shape[1], width + room, k0.shape[3])
    values = v0.new_empty(rows, v0.shape[1], width + room, v0.shape[3])
    start = 0
    for k, v in pieces:
        end, n = start + len(k), k.shape[2]
        keys[start:end, :, :n] = k
        values[start:end, :, :n] = v
        keys[start:end, :, n:width] = 0
        values[start:end, :, n:width] = 0
        start = end
    return keys, values


def fill_order(live: Sequence[int], batch: int) -> list[int]:
    """The rows `live` of a batch of `batch`, in the order where each slot keeps its row and the
    slots of the rows that leave take the live rows from past the new end: compacting the KV in
    place then copies only those (not every row, as moving them all up would)."""
    kept = set(live)
    order = list(range(len(live)))
    holes = [slot for slot in order if slot not in kept]
    for slot, row in zip(holes, [r for r in live if r >= len(live)], strict=True):
        order[slot] = row
    return order


def filling(rows: torch.Tensor, batch: int) -> bool:
    """Whether `rows` is a `fill_order` of a batch of `batch`: distinct rows, each slot keeping
    its own row or taking one from past the new end."""
    slots = torch.arange(len(rows), device=rows.device)
    distinct = len(torch.unique(rows)) == len(rows)
    return bool(distinct and len(rows) <= batch and ((rows == slots) | (rows >= len(rows))).all())


def reserved_room(cache) -> int:
    """How many more tokens `cache` can take in place (0: it grows by concatenation)."""
    layers = getattr(cache, "layers", None)
    if not layers or DynamicLayer is None or not isinstance(layers[0], ReservedLayer):
        return 0
    return layers[0].room


def truncatable(cache) -> bool:
    """Whether `truncate` can shorten `cache`: a cache of reserved layers."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and DynamicLayer is not None and isinstance(layers[0], ReservedLayer)


def truncate(cache, length: int) -> None:
    """Keep the first `length` slots of every layer of `cache` (a `truncatable` one)."""
    for layer in cache.layers:
        layer.truncate(length)


def kv_shape(model: torch.nn.Module) -> KVShape:
    """(layers, kv_heads, head_dim) of `model`'s KV cache, read from one probe forward pass.

    A key/value prefix (prefix tuning) is, per layer, keys and values of [kv_heads, n, head_dim]
    that every position attends to. A model whose cache is not laid out so (sliding-window or
    other non-global layers, shapes that differ between layers or between keys and values, a
    state that is no per-layer KV cache) gets one ValueError line.
    """
    if model in _SHAPES:
        return _SHAPES[model]
    config = model.config.get_text_config()
    name = type(model).__name__
    kinds = sorted(set(getattr(config, "layer_types", None) or []) - {"full_attention"})
    if kinds:  # a window or a shared KV would cut the prefix off some layers' view
        raise ValueError(f"{name} has {', '.join(kinds)} layers; {_NEEDS}")
    try:
        with torch.no_grad():
            probe = torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device)
            _, cache = run(model.base_model, input_ids=probe, use_cache=True)
            states = layer_states(cache)
    except (TypeError, AttributeError, KeyError) as err:
        raise ValueError(f"{name}'s cache could not be read ({err}); {_NEEDS}") from None
    shapes = {(tuple(k.shape), tuple(v.shape)) for k, v in states}
    layers = int(getattr(config, "num_hidden_layers", len(states)))
    if len(shapes) != 1 or len(states) != layers:
        raise ValueError(f"{name}'s cache holds {len(states)} layers of shapes {shapes}; {_NEEDS}")
    ((keys, values),) = shapes
    if keys != values or len(keys) != 4 or keys[2] != 1:
        raise ValueError(f"{name}'s cache holds keys {keys} and values {values}; {_NEEDS}")
    _SHAPES[model] = (len(states), keys[1], keys[3])
    return _SHAPES[model]


_NEEDS = (
    "a key/value prefix needs a decoder whose every layer caches keys and values of one shape "
    "[kv_heads, tokens, head_dim]"
)
