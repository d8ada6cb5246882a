"""Last-token fusion at inference: the last prompt token's K/V fused as the receiver writes them, one layer at a time.

The receiver's layer ``l`` writes the token's K/V only after layer ``l - 1`` attended over the fused ones, so the
layers are fused one after another, inside the receiver's forward (a
:class:`~fedrefine.kv.cache.WriteHookCache` hook). Everything that does not depend on the receiver's states is
made once, before the forward: the senders' columns the token reads (gathered, un-rotated), the receiver's rotary
angles at the token's position (as rotation matrices: one product per layer un-rotates the token's keys, one rotates
their delta), each sender's scale, each open layer's stacked fuser weights (views), and the fusers' input Linear over
the senders' token for every layer at once (it reads nothing of the receiver). A layer's hook then runs only the
rest of the fuser on one row and the rotation and add on one column: no per-position RoPE pass, no stacking, no
Python over the other layers.

The same math as :meth:`~fedrefine.fusion.residual.ResidualFusion.fuse` on one column (tests compare the two);
used without autograd (evaluation, serving, benchmarks), the training path keeps the general fusion.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedrefine.fuser.layers import stream_inputs
from fedrefine.fuser.stacked import StackedStream
from fedrefine.fusion.strategy import FusionInput
from fedrefine.kv.cache import LayerKV, positions_from_mask
from fedrefine.kv.rope import RotaryFrame
from fedrefine.kv.stack import KVStack
from fedrefine.participants import Participant


@dataclass(frozen=True)
class _Sender:
    """One sender's fuser and everything it reads at the last prompt token but the receiver's states."""

    streams: dict[int, StackedStream]  # receiver layer -> its stacked [K ;] V streams
    parts: dict[int, Tensor]  # receiver layer -> its [K ;] V streams' input Linear over the sender's token (S, B, hidden)
    scales: Tensor  # (L_t, S, B, 1): the [K ;] V streams' scale per receiver layer
    slots: int  # S: the streams carried (2: keys and values; 1: values only)
    in_cache: bool  # keys read and written as the cache holds them (the C2C reference's frame)
    reads_keys: bool  # the key stream reads the receiver's keys


def sequential_frames_checked(combine: str, in_cache: Sequence[bool]) -> None:
    """Sequential fusion reads each fuser's output in the next one's key frame: the fusers must share it."""
    if combine == "sequential" and 0 < sum(in_cache) < len(in_cache):
        raise ValueError(
            "Sequential fusion reads each fuser's output in the next one's key frame; these senders' fusers mix "
            "the position-free and the cache (C2C reference) frame: set combine to 'parallel'."
        )


class LastTokenFusion:
    """The hook fusing the last prompt token (column ``column`` of the receiver's first write) layer by layer.

    Args:
        receiver: the receiver (its rotary embedding).
        input_ids, attention_mask: the receiver's prompt (B, N).
        inputs: each sender's part; every fuser in inference (eval, no autograd).
        consumed: prompt tokens already in the receiver's cache before the write that holds the last one.
        combine: ``parallel`` or ``sequential`` (see :data:`~fedrefine.fusion.residual.Combine`).
        reads: each input's sender columns at the last prompt token (``ResidualFusion.sender_reads``).
        scales: each input's (L_t, B, 1) scale at that token (``ResidualFusion._scale``).
    """

    def __init__(
        self, receiver: Participant, input_ids: Tensor, attention_mask: Tensor, inputs: Sequence[FusionInput],
        consumed: int, combine: str, reads: Sequence[KVStack], scales: Sequence[Tensor],
    ) -> None:
        last = input_ids.shape[1] - 1
        self.column, self.sequential = last - consumed, combine == "sequential"
        self.dtype = next(inputs[0].fuser.parameters()).dtype
        frame = RotaryFrame(receiver.rotary_embedding, positions_from_mask(attention_mask)[:, last:])  # (B, 1)
        self.rotation, self.unrotation = frame.matrices()  # (B, 1, D_t, D_t) each, fp32
        in_cache = [item.fuser.key_frame == "cache" for item in inputs]
        sequential_frames_checked(combine, in_cache)
        self.senders = [self._sender(item, read, scale, cached) for item, read, scale, cached in zip(inputs, reads, scales, in_cache)]

    @staticmethod
    def _sender(item: FusionInput, read: KVStack, scale: Tensor, in_cache: bool) -> _Sender:
        fuser = item.fuser
        stack, streams = fuser.inference_streams()  # every open layer's, stacked: the sender's half in one product each
        opened = [i for i in streams if fuser.layer_map[i] in read.layers]
        carried = ((read.values,) if read.keys is None or not fuser.fuses_keys  # what the [K ;] V streams read
                   else stream_inputs(read.keys, read.values, fuser.config.reads_kv_together))
        scales = scale.new_zeros((scale.shape[0], len(carried), *scale.shape[1:]))  # (L_t, S, B, 1)
        parts = {}
        if opened:
            key_scale, value_scale = fuser._stream_scales(opened, scale[opened], read.values)  # (R, B, 1) each
            scales[opened] = torch.stack((key_scale, value_scale)[-len(carried):], dim=1)
            reads = torch.tensor([read.layers.index(fuser.layer_map[i]) for i in opened], device=read.values.device)
            rows = [stack.indices.index(i) for i in opened]
            index = None if rows == list(range(len(stack.indices))) else torch.tensor(rows, device=read.values.device)
            products = [stream.sender_product(states.index_select(0, reads),
                                              None if index is None else tuple(w.index_select(0, index) for w in stream.sender_input))
                        for stream, states in zip((stack.key, stack.value)[-len(carried):], carried)]  # (R, B, hidden) each
            parts = dict(zip(opened, torch.stack(products, dim=1).unbind(0)))  # layer -> (S, B, hidden)
        return _Sender(streams, parts, scales, len(carried), in_cache, fuser.reads_receiver_keys)

    def __call__(self, layer: int, keys: Tensor, values: Tensor) -> LayerKV:
        """The receiver's new K/V of ``layer`` (B, H_t, n, D_t) with the last prompt token's column fused (in place:
        the tensors are the receiver's fresh projections, read by nothing else)."""
        column = slice(self.column, self.column + 1)
        own_keys, own_values = keys[:, :, column], values[:, :, column]  # (B, H_t, 1, D_t)
        free_keys = cached_keys = None  # the token's keys as the fusers read them, made when first read
        deltas = {False: None, True: None}  # [dK ;] dV (S, B, H_t, 1, D_t) by key frame (in the cache's or not)
        for sender in self.senders:
            part = sender.parts.get(layer)
            if part is None:
                continue
            if sender.in_cache:
                cached_keys = own_keys.to(self.dtype) if cached_keys is None else cached_keys
                token_keys = cached_keys
            else:
                if free_keys is None and sender.reads_keys:  # one product un-rotates the token's keys
                    free_keys = torch.matmul(own_keys.float(), self.unrotation).to(self.dtype)
                token_keys = own_keys if free_keys is None else free_keys  # not read without reads_keys
            token = torch.stack((token_keys, own_values.to(self.dtype)))[-sender.slots:]  # (S, B, H_t, 1, D_t)
            if self.sequential:  # each fuser reads the token as the ones before it fused it
                token = _plus(token, deltas[sender.in_cache], keep=True)
            delta = sender.streams[layer](None, token, sender.scales[layer], sender_part=part)
            deltas[sender.in_cache] = _plus(deltas[sender.in_cache], delta)
        free, cached = deltas[False], deltas[True]
        if free is None and cached is None:
            return keys, values
        for delta in (d for d in (free, cached) if d is not None):
            own_values.add_(delta[-1].to(values.dtype))
        if free is not None and free.shape[0] == 2:
            own_keys.add_(torch.matmul(free[0].float(), self.rotation).to(keys.dtype))
        if cached is not None and cached.shape[0] == 2:
            own_keys.add_(cached[0].to(keys.dtype))
        return keys, values


def _plus(total: Tensor | None, delta: Tensor | None, keep: bool = False) -> Tensor | None:
    """``total + delta`` over their common trailing slots (a values-only fuser's [dV] beside another's [dK ; dV]):
    shaped as the longer, or as ``total`` with ``keep``; the one given when the other is None."""
    if delta is None or total is None:
        return total if delta is None or keep else delta
    if delta.shape[0] > total.shape[0] and not keep:
        total, delta = delta, total
    common = min(total.shape[0], delta.shape[0])
    return torch.cat((total[: total.shape[0] - common], total[-common:] + delta[-common:]))
