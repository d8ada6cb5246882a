"""Several layers' K/V on one leading layer axis, so that one tensor operation covers every layer.

Fusion touches every layer of a cache the same way (rotary removal, gathering the aligned sender
columns, the fusers, masking, the residual add). Done one layer at a time that is a few hundred
small kernels and the Python around them; over a :class:`KVStack` it is a handful of large ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedrefine.kv.cache import LayerKV


def slot_index(held: Sequence[int], layers: Sequence[int], device: torch.device) -> Tensor:
    """Where each of ``layers`` (repeats allowed) sits in a stack holding ``held``, as an index tensor."""
    slot = {layer: i for i, layer in enumerate(held)}
    missing = [layer for layer in layers if layer not in slot]
    if missing:
        raise KeyError(f"Layers {missing} are not in this KVStack (it holds {list(held)}).")
    return torch.tensor([slot[layer] for layer in layers], dtype=torch.long, device=device)


@dataclass(frozen=True)
class KVStack:
    """K/V of the layers ``layers`` stacked in that order: slot ``i`` holds layer ``layers[i]``.

    Args:
        layers: the layer index of each slot.
        keys: (L, B, H, N, D), or None where keys are not carried (values-only fusion keeps the
            receiver's keys).
        values: (L, B, H, N, D).
    """

    layers: tuple[int, ...]
    keys: Tensor | None
    values: Tensor

    def __post_init__(self) -> None:
        if len(self.layers) != self.values.shape[0] or (self.keys is not None and self.keys.shape[0] != len(self.layers)):
            raise ValueError(
                f"A KVStack of {len(self.layers)} layers needs that many slots; got values {tuple(self.values.shape)}"
                + ("" if self.keys is None else f" and keys {tuple(self.keys.shape)}")
                + "."
            )

    @classmethod
    def of(cls, kv: Mapping[int, LayerKV], keys: bool = True, heads_last: bool = False) -> KVStack:
        """Stack per-layer (K, V) (each (B, H, N, D)) in ascending layer order; ``keys=False`` drops the keys.
        ``heads_last``: held as (L, B, N, H, D) in memory (still shaped (L, B, H, N, D)), the layout of the fusers'
        rows (one per token, heads side by side): :func:`~fedrefine.fuser.stacked.rows` is a view then."""
        if not kv:
            raise ValueError("A KVStack needs at least one layer.")
        layers = tuple(sorted(kv))

        def stack(tensors: list[Tensor]) -> Tensor:  # (L, B, H, N, D)
            if not heads_last:
                return torch.stack(tensors)
            return torch.stack([t.transpose(1, 2) for t in tensors]).transpose(2, 3)  # one copy, heads-last

        stacked_keys = stack([kv[i][0] for i in layers]) if keys else None
        return cls(layers, stacked_keys, stack([kv[i][1] for i in layers]))

    def slots(self, layers: Sequence[int]) -> Tensor:
        """The slot of each of ``layers`` (repeats allowed), as an index tensor."""
        return slot_index(self.layers, layers, self.values.device)

    def select(self, layers: Sequence[int]) -> KVStack:
        """The given layers, in that order (a layer may appear twice: a layer map that reads it twice)."""
        if tuple(layers) == self.layers:
            return self
        index = self.slots(layers)
        keys = None if self.keys is None else self.keys.index_select(0, index)
        return KVStack(tuple(layers), keys, self.values.index_select(0, index))

    def map(self, keys: Callable[[Tensor], Tensor] | None, values: Callable[[Tensor], Tensor]) -> KVStack:
        """The same layers with ``keys`` and ``values`` applied to the stacked tensors (no keys: dropped)."""
        mapped_keys = None if keys is None or self.keys is None else keys(self.keys)
        return KVStack(self.layers, mapped_keys, values(self.values))

    def layer(self, layer: int) -> LayerKV:
        """One layer's (K, V), each (B, H, N, D); the keys must be carried."""
        if self.keys is None:
            raise ValueError("This KVStack carries values only.")
        slot = self.layers.index(layer)
        return self.keys[slot], self.values[slot]

    def unbind(self) -> dict[int, LayerKV]:
        """Layer -> (K, V) views; the keys must be carried."""
        if self.keys is None:
            raise ValueError("This KVStack carries values only.")
        return dict(zip(self.layers, zip(self.keys.unbind(0), self.values.unbind(0))))


def layer_chunks(kv: Mapping[int, LayerKV], max_bytes: int) -> list[dict[int, LayerKV]]:
    """``kv`` split, in ascending layer order, into chunks whose stacked values take at most ``max_bytes``
    in float32 (at least one layer per chunk)."""
    layers = sorted(kv)
    per_layer = kv[layers[0]][1].numel() * 4
    size = max(1, max_bytes // max(1, per_layer))
    return [{i: kv[i] for i in layers[a : a + size]} for a in range(0, len(layers), size)]
