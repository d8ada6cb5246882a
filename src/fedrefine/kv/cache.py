"""KV caches: per-layer access over transformers' Cache API, byte counts, padded positions.

Rotary embedding helpers live in :mod:`fedrefine.kv.rope`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from functools import cache as memoize

from torch import Tensor, nn
from transformers import Cache, DynamicCache

#: One layer's cache: keys and values, each (batch, kv_heads, seq, head_dim).
LayerKV = tuple[Tensor, Tensor]


def cache_to_layers(cache: Cache) -> list[LayerKV]:
    """Per-layer (K, V) tensors of a transformers Cache (views, not copies)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"Expected a transformers Cache with per-layer storage, got {type(cache).__name__}.")
    out = []
    for index, layer in enumerate(layers):
        if getattr(layer, "keys", None) is None or not layer.keys.numel():
            raise ValueError(f"Cache layer {index} is empty: run a prefill before reading the cache.")
        out.append((layer.keys, layer.values))
    return out


@memoize
def _cache_keyword(model_class: type) -> str:
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def with_cache(model: nn.Module, cache: Cache | None) -> dict[str, Cache | None]:
    """The forward keyword argument that hands ``model`` a KV cache: ``cache`` in recent transformers 5
    releases (``past_key_values`` is deprecated there), ``past_key_values`` before."""
    return {_cache_keyword(type(model)): cache}


def returned_cache(output) -> Cache:
    """The KV cache a forward pass returned (``output.cache``, or ``past_key_values`` in older releases)."""
    found = getattr(output, "cache", None)
    return found if found is not None else output.past_key_values


def _empty_views(layers: Sequence[LayerKV]) -> list[LayerKV]:
    """Zero-length views of each layer's K/V (B, H, 0, D): what a DynamicCache is built from without copying."""
    return [(k[:, :, :0], v[:, :, :0]) for k, v in layers]


def _hold(cache: DynamicCache, layers: Sequence[LayerKV]) -> DynamicCache:
    """``cache`` (built from :func:`_empty_views`) made to hold ``layers`` themselves. Building it from the
    tensors would copy every layer (a cache's first write concatenates onto an empty tensor); writes after
    this concatenate into new tensors, so the given ones are never changed."""
    for layer, (keys, values) in zip(cache.layers, layers, strict=True):
        layer.keys, layer.values = keys, values
    return cache


def layers_to_cache(layers: Sequence[LayerKV]) -> DynamicCache:
    """A DynamicCache holding the given per-layer (K, V) tensors (the tensors themselves, not copies)."""
    return _hold(DynamicCache(ddp_cache_data=_empty_views(layers)), layers)


class WriteHookCache(DynamicCache):
    """A DynamicCache whose first write to each layer goes through ``hook(layer, keys, values)``.

    The model writes a layer's new K/V (keys with rotary applied) before attending over them,
    so the hook changes what the new tokens themselves attend to, in every architecture.
    Later writes (decoding steps) are stored unchanged.
    """

    def __init__(self, layers: Sequence[LayerKV], hook) -> None:
        super().__init__(ddp_cache_data=_empty_views(layers))
        _hold(self, layers)
        self.hook, self.hooked_layers = hook, set()

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx not in self.hooked_layers:
            self.hooked_layers.add(layer_idx)
            key_states, value_states = self.hook(layer_idx, key_states, value_states)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def kv_nbytes(layers: Sequence[LayerKV]) -> int:
    """Exact bytes held by per-layer K/V tensors."""
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)


def kv_bytes_per_token(layers: Sequence[LayerKV]) -> int:
    """Bytes of K and V for one token of one sequence, over all given layers."""
    total = 0
    for k, v in layers:
        total += k.shape[1] * k.shape[3] * k.element_size() + v.shape[1] * v.shape[3] * v.element_size()
    return total


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids for a (left- or right-) padded batch: 0 at each sample's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def select_rows(cache: Cache, rows: Tensor) -> DynamicCache:
    """A new cache holding the given rows (B',) of ``cache`` in that order, a row as often as it is named: several
    continuations of one prompt read each read a copy of it. ``cache`` is left as it is."""
    return layers_to_cache([(k.index_select(0, rows), v.index_select(0, rows)) for k, v in cache_to_layers(cache)])
