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
from collections.abc import Sequence

import torch
from transformers import DynamicCache

# Per layer, the (keys, values) of a prefix: [batch, heads, tokens, head_dim] each.
LayerStates = list[tuple[torch.Tensor, torch.Tensor]]


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
    out = module(**inputs, **{cache_argument(module): cache})
    # A ModelOutput holds only the fields that are set, under the installed version's name.
    returned = out["cache"] if "cache" in out else out.get("past_key_values")
    return out, returned


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


def padded_cache(config, states: Sequence[LayerStates | None], width: int) -> DynamicCache:
    """A cache holding one prefix state per batch row, left-aligned and zero-padded to `width`.

    A row without a prefix (None) gets `width` zero slots. The caller's attention mask must hide
    the padded slots: their zeros are never to be attended to.
    """
    some = next(s for s in states if s)
    layers = []
    for layer, (k0, _) in enumerate(some):
        keys, values = [], []
        for state in states:
            k, v = state[layer] if state else (k0[:, :, :0], k0[:, :, :0])
            pad = (0, 0, 0, width - k.shape[2])
            keys.append(torch.nn.functional.pad(k, pad))
            values.append(torch.nn.functional.pad(v, pad))
        layers.append((torch.cat(keys), torch.cat(values)))
    return build_cache(config, layers)


@functools.cache
def _takes_config() -> bool:
    # DynamicCache(config=...) sets up per-layer types (sliding windows); 4.48 has no such argument.
    return "config" in inspect.signature(DynamicCache.__init__).parameters


def select_rows(config, cache, rows: torch.Tensor) -> DynamicCache:
    """A cache holding the batch rows `rows` of `cache`, in that order (repeats allowed)."""
    return build_cache(
        config, [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in layer_states(cache)]
    )
