"""Residual fusion (C2C): fuser deltas added to the receiver's own cache at aligned token positions.

    the receiver prefills its prompt except the last token               -> receiver cache
    each fuser adds g*w*p at the aligned positions (pre-RoPE); senders combine in parallel
    (sum of deltas) or in sequence (each fuser reads the cache already fused)
    the receiver runs the last prompt token (+ response / generation) over the fused cache

``fuse_at`` chooses the fused receiver tokens: ``prompt`` (the C2C reference: every aligned
token but the last), ``all`` (the last one too), ``last`` (only the last prompt token, fused as
the receiver writes it, through :class:`~fedrefine.cache.WriteHookCache`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from fedrefine.cache import LayerKV, WriteHookCache, cache_to_layers, layers_to_cache, positions_from_mask
from fedrefine.fuser import FuseAt
from fedrefine.fusion.batch import SenderBatch
from fedrefine.fusion.strategy import FusionInput, FusionStrategy, ReceiverContext, prefill_all_but_last
from fedrefine.participants import Participant
from fedrefine.rope import RotaryFrame

#: Several senders: ``parallel`` sums their deltas (the C2C reference); ``sequential`` lets each fuser
#: read the cache the previous ones fused.
Combine = Literal["parallel", "sequential"]
LayerHook = Callable[[int, Tensor, Tensor], LayerKV]


class ResidualFusion(FusionStrategy):
    """Adds every sender's deltas to the receiver's cache where its tokens are aligned.

    Args:
        fuse_at: which receiver tokens are fused (``prompt``, ``all`` or ``last``).
        combine: ``parallel`` or ``sequential`` (see :data:`Combine`).
    """

    mode, aligns = "residual", True

    def __init__(self, fuse_at: FuseAt = "prompt", combine: Combine = "parallel") -> None:
        self.fuse_at, self.combine = fuse_at, combine

    def sent_positions(self, batch: SenderBatch) -> Tensor | None:
        """With ``fuse_at: last`` only the sender column the last prompt token reads is transmitted."""
        if self.fuse_at != "last" or batch.alignment is None:
            return None
        read = batch.alignment[:, -1:]  # (B, 1): the sender column each sample's last prompt token reads
        sent = (read >= 0).to(batch.attention_mask.dtype)
        return torch.zeros_like(batch.attention_mask).scatter(1, read.clamp(min=0), sent)  # (B, N_s)

    def prepare(
        self,
        receiver: Participant,
        input_ids: Tensor,
        attention_mask: Tensor,
        inputs: Sequence[FusionInput],
        own: ReceiverContext | None = None,
    ) -> ReceiverContext:
        context = own or prefill_all_but_last(receiver, input_ids, attention_mask)
        layers = cache_to_layers(context.cache)
        if self.fuse_at != "last":
            positions = positions_from_mask(attention_mask[:, : context.consumed])  # (B, N - 1)
            fused = self.fuse(receiver, dict(enumerate(layers)), positions, attention_mask, inputs)
            layers = [fused[layer] for layer in range(len(layers))]
        if self.fuse_at == "prompt":
            return ReceiverContext(layers_to_cache(layers), None, context.consumed)
        hook = self._last_token_hook(receiver, input_ids, attention_mask, inputs)
        return ReceiverContext(WriteHookCache(layers, hook), None, context.consumed)

    def fuse(
        self,
        receiver: Participant,
        receiver_layers: Mapping[int, LayerKV],
        positions: Tensor,
        attention_mask: Tensor,
        inputs: Sequence[FusionInput],
        start: int = 0,
    ) -> dict[int, LayerKV]:
        """Fused K/V of the given receiver layers (index -> rotated K, V, each (B, H_t, n, D_t)) over the
        prompt columns ``start ... start + n``, whose receiver positions are ``positions`` (B, n)."""
        length = next(iter(receiver_layers.values()))[0].shape[2]
        columns = slice(start, start + length)
        dtype = next(inputs[0].fuser.parameters()).dtype
        frame = RotaryFrame(receiver.rotary_embedding, positions)
        base: list[LayerKV | None] = [None] * receiver.identity.num_layers
        for layer, (keys, values) in receiver_layers.items():
            base[layer] = (frame.unrotate(keys).to(dtype), values.to(dtype))
        totals: list[list[Tensor] | None] = [None] * len(base)
        for item in inputs:
            if item.alignment is None:
                raise ValueError(
                    f"Residual fusion needs an alignment for sender {item.kv.sender.name}; encode in residual mode."
                )
            alignment = item.alignment[:, columns]  # (B, n): sender column each receiver column reads
            where = ((alignment >= 0) & attention_mask[:, columns].bool())[:, None, :, None]  # (B, 1, n, 1)
            gathered = item.kv.unrotated(dtype, index=alignment.clamp(min=0))  # (B, H_s, n, D_s) per layer
            reads = self._current(base, totals) if self.combine == "sequential" else base
            deltas = item.fuser(gathered, reads)
            for layer, delta in enumerate(deltas):
                if delta is None:
                    continue
                scale = 1.0 if item.weight is None else item.weight[:, layer].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
                masked = [torch.where(where, d * scale, 0.0) for d in delta]
                totals[layer] = masked if totals[layer] is None else [a + b for a, b in zip(totals[layer], masked)]
        fused = {}
        for layer, (keys, values) in receiver_layers.items():
            total = totals[layer]
            if total is None:
                fused[layer] = (keys, values)
                continue
            fused[layer] = (keys + frame.rotate(total[0]).to(keys.dtype), values + total[1].to(values.dtype))
        return fused

    @staticmethod
    def _current(base: list[LayerKV | None], totals: list[list[Tensor] | None]) -> list[LayerKV | None]:
        return [kv if t is None or kv is None else (kv[0] + t[0], kv[1] + t[1]) for kv, t in zip(base, totals)]

    def _last_token_hook(
        self, receiver: Participant, input_ids: Tensor, attention_mask: Tensor, inputs: Sequence[FusionInput]
    ) -> LayerHook:
        """Fuses the last prompt token's K/V as the receiver writes them, layer by layer."""
        last = input_ids.shape[1] - 1
        position = positions_from_mask(attention_mask)[:, last:]  # (B, 1)

        def hook(layer: int, keys: Tensor, values: Tensor) -> LayerKV:
            head = {layer: (keys[:, :, :1], values[:, :, :1])}  # the last prompt token: (B, H_t, 1, D_t)
            fused_keys, fused_values = self.fuse(receiver, head, position, attention_mask, inputs, start=last)[layer]
            return torch.cat((fused_keys, keys[:, :, 1:]), dim=2), torch.cat((fused_values, values[:, :, 1:]), dim=2)

        return hook
