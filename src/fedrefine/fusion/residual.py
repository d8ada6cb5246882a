"""Residual fusion (C2C): fuser deltas added to the receiver's own cache at aligned token positions.

    the receiver prefills its prompt except the last token               -> receiver cache
    each fuser adds g*w*p at the aligned positions (pre-RoPE); senders combine in parallel
    (sum of deltas) or in sequence (each fuser reads the cache already fused)
    the receiver runs the last prompt token (+ response / generation) over the fused cache

``fuse_at`` chooses the fused receiver tokens: ``prompt`` (the C2C reference: every aligned
token but the last), ``all`` (the last one too), ``last`` (only the last prompt token, fused as
the receiver writes it, through :class:`~fedrefine.kv.cache.WriteHookCache`). With ``last`` and no
prefill of the receiver's own yet, a prompt read (``whole_prompt``) runs the whole prompt at once and
fuses its last token as it is written: earlier tokens never attend to it, so nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from fedrefine.fuser import FuseAt
from fedrefine.fusion.batch import SenderBatch
from fedrefine.fusion.last_token import LastTokenFusion, sequential_frames_checked
from fedrefine.fusion.strategy import FusionInput, FusionStrategy, ReceiverContext, prefill_all_but_last
from fedrefine.kv.cache import LayerKV, WriteHookCache, cache_to_layers, layers_to_cache, positions_from_mask
from fedrefine.kv.rope import RotaryFrame
from fedrefine.kv.stack import KVStack, layer_chunks, slot_index
from fedrefine.participants import Participant

#: Several senders: ``parallel`` sums their deltas (the C2C reference); ``sequential`` lets each fuser
#: read the cache the previous ones fused.
Combine = Literal["parallel", "sequential"]
LayerHook = Callable[[int, Tensor, Tensor], LayerKV]
#: Receiver layers are fused in chunks whose stacked K (or V) stays under this size: a batch-1 prompt is one
#: chunk; larger batches keep every temporary cache-sized instead of many hundreds of MB.
FUSE_CHUNK_BYTES = 32 * 2**20


class ResidualFusion(FusionStrategy):
    """Adds every sender's deltas to the receiver's cache where its tokens are aligned.

    Args:
        fuse_at: which receiver tokens are fused (``prompt``, ``all`` or ``last``).
        combine: ``parallel`` or ``sequential`` (see :data:`Combine`).
    """

    mode, aligns = "residual", True

    def __init__(self, fuse_at: FuseAt = "prompt", combine: Combine = "parallel") -> None:
        self.fuse_at, self.combine = fuse_at, combine
        # the last prompt token alone reads a sender: only the last message (the shared answer prefix) is aligned,
        # so a sender may read its own rephrasing of the question (private mode)
        self.aligned_messages = "last" if fuse_at == "last" else "all"

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
        whole_prompt: bool = False,
    ) -> ReceiverContext:
        if self.fuse_at == "last" and own is None and whole_prompt:  # the last prompt token is fused as it is read
            hook = self._last_token_hook(receiver, input_ids, attention_mask, inputs, consumed=0)
            return ReceiverContext(WriteHookCache([], hook), None, consumed=0)
        cut = self.prefill_cut(inputs, input_ids.shape[1])
        context = own if own is not None and own.consumed == cut else prefill_all_but_last(receiver, input_ids, attention_mask, cut)
        layers = cache_to_layers(context.cache)
        if self.fuse_at != "last":
            positions = positions_from_mask(attention_mask[:, : context.consumed])  # (B, N - 1)
            fused = self.fuse(receiver, dict(enumerate(layers)), positions, attention_mask, inputs)
            layers = [fused[layer] for layer in range(len(layers))]
        if self.fuse_at == "prompt":
            return ReceiverContext(layers_to_cache(layers), None, context.consumed)
        hook = self._last_token_hook(receiver, input_ids, attention_mask, inputs, context.consumed)
        return ReceiverContext(WriteHookCache(layers, hook), None, context.consumed)

    @staticmethod
    def prefill_cut(inputs: Sequence[FusionInput], length: int) -> int:
        """How many prompt columns the receiver prefills before fusion: all but the last, or, with a sender aligned
        the C2C reference's way, up to its last aligned column (the reference runs the text after it, e.g. the
        answer prefix, over the fused cache)."""
        ends = []
        for item in inputs:
            aligned = None if item.alignment is None else item.alignment.ge(0)  # (B, N)
            if item.fuser.config.token_alignment == "spans" or aligned is None or not aligned.any():
                ends.append(length - 1)
            else:  # one past the last aligned column of any sample
                ends.append(int(aligned.cumsum(1).argmax(1).max()) + 1)
        return min(max(ends, default=length - 1), length - 1)

    def fuse(
        self,
        receiver: Participant,
        receiver_layers: Mapping[int, LayerKV],
        positions: Tensor,
        attention_mask: Tensor,
        inputs: Sequence[FusionInput],
        start: int = 0,
        reads: Sequence[KVStack] | None = None,
        frame: RotaryFrame | None = None,
    ) -> dict[int, LayerKV]:
        """Fused K/V of the given receiver layers (index -> rotated K, V, each (B, H_t, n, D_t)) over the
        prompt columns ``start ... start + n``, whose receiver positions are ``positions`` (B, n).

        ``reads``: each input's :meth:`sender_reads` over those columns, and ``frame``: the receiver's rotary frame
        at ``positions``, when already made (a layer-by-layer fusion makes them once).
        """
        length = next(iter(receiver_layers.values()))[0].shape[2]
        columns = slice(start, start + length)
        dtype = next(inputs[0].fuser.parameters()).dtype
        reads = self.sender_reads(inputs, columns, dtype) if reads is None else reads
        frame = RotaryFrame(receiver.rotary_embedding, positions) if frame is None else frame
        fused: dict[int, LayerKV] = {}
        for chunk in layer_chunks(receiver_layers, FUSE_CHUNK_BYTES):
            fused |= self._fuse_layers(frame, chunk, columns, attention_mask, inputs, reads, dtype)
        return fused

    def _fuse_layers(
        self,
        frame: RotaryFrame,
        receiver_layers: Mapping[int, LayerKV],
        columns: slice,
        attention_mask: Tensor,
        inputs: Sequence[FusionInput],
        reads: Sequence[KVStack],
        dtype: torch.dtype,
    ) -> dict[int, LayerKV]:
        """:meth:`fuse` over some receiver layers, stacked. Fusers of the ``position_free`` key frame read and write
        un-rotated keys; those of the ``cache`` frame (the C2C reference's) the keys as the cache holds them."""
        own = KVStack.of(receiver_layers, heads_last=True)  # rotated, the model's dtype: (L, B, H_t, n, D_t), heads last
        in_cache = [item.fuser.key_frame == "cache" for item in inputs]
        sequential_frames_checked(self.combine, in_cache)
        reads_free = any(i.fuser.reads_receiver_keys and not cached for i, cached in zip(inputs, in_cache))
        unrotate = (lambda k: frame.unrotate(k).to(dtype)) if reads_free else None
        base = own.map(unrotate, lambda v: v.to(dtype))  # what position-free fusers read
        cached_base = own.map(lambda k: k.to(dtype), lambda v: v.to(dtype)) if any(in_cache) else None
        totals, cached_totals = _Totals(own.layers), _Totals(own.layers)
        for item, gathered, cached in zip(inputs, reads, in_cache):
            view, sums = (cached_base, cached_totals) if cached else (base, totals)
            current = view if self.combine == "parallel" else sums.added_to(view)
            deltas = item.fuser(gathered, current, self._scale(item, columns, attention_mask, dtype))
            if deltas is not None:  # (R, B, H_t, n, D_t) over the fused layers
                sums.add(deltas)
        if totals.empty and cached_totals.empty:
            return dict(receiver_layers)
        keys = own.keys if totals.keys is None else frame.add_rotated(own.keys, totals.keys)
        keys = keys if cached_totals.keys is None else _plus(keys, cached_totals.keys)
        values = own.values if totals.values is None else _plus(own.values, totals.values)
        values = values if cached_totals.values is None else _plus(values, cached_totals.values)
        return KVStack(own.layers, keys, values).unbind()

    @staticmethod
    def _scale(item: FusionInput, columns: slice, attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
        """(L_t, B, n) what each receiver layer's deltas are multiplied by at each fused column: 0 where the
        column is padding or reads no sender column, times the gating network's share of this sender."""
        aligned = (item.alignment[:, columns] >= 0) & attention_mask[:, columns].bool()  # (B, n)
        if item.weight is None:
            return aligned.to(dtype)[None].expand(item.fuser.receiver.num_layers, -1, -1)
        return item.weight.T.to(dtype)[:, :, None] * aligned[None]  # the share per sample and layer: (L_t, B, 1)

    @staticmethod
    def sender_reads(inputs: Sequence[FusionInput], columns: slice, dtype: torch.dtype) -> list[KVStack]:
        """Each sender's carried layers at the columns its alignment reads for receiver ``columns``, in its fuser's
        key frame (unrotated, or as cached): (J, B, H_s, n, D_s)."""
        reads = []
        for item in inputs:
            if item.alignment is None:
                raise ValueError(
                    f"Residual fusion needs an alignment for sender {item.kv.sender.name}; encode in residual mode."
                )
            index = item.alignment[:, columns].clamp(min=0)  # (B, n): sender column each receiver column reads
            read = item.kv.as_cached if item.fuser.key_frame == "cache" else item.kv.unrotated
            reads.append(read(dtype, index=index, keys=item.fuser.fuses_keys))
        return reads

    def _last_token_hook(
        self, receiver: Participant, input_ids: Tensor, attention_mask: Tensor, inputs: Sequence[FusionInput], consumed: int
    ) -> LayerHook:
        """Fuses the last prompt token's K/V as the receiver writes them, layer by layer, in the first write after
        the ``consumed`` tokens already cached (the senders' columns and the rotary frame are made once, not once
        per layer). In inference the hook is a :class:`~fedrefine.fusion.last_token.LastTokenFusion` (the same math
        on the one column, everything but the fuser's products made before the forward)."""
        last = input_ids.shape[1] - 1
        column = last - consumed  # where the last prompt token sits in that write
        position = positions_from_mask(attention_mask)[:, last:]  # (B, 1)
        dtype = next(inputs[0].fuser.parameters()).dtype
        reads = self.sender_reads(inputs, slice(last, last + 1), dtype)
        if not torch.is_grad_enabled() and not any(item.fuser.training for item in inputs):
            scales = [self._scale(item, slice(last, last + 1), attention_mask, dtype) for item in inputs]
            return LastTokenFusion(receiver, input_ids, attention_mask, inputs, consumed, self.combine, reads, scales)
        frame = RotaryFrame(receiver.rotary_embedding, position)

        def hook(layer: int, keys: Tensor, values: Tensor) -> LayerKV:
            head = {layer: (keys[:, :, column : column + 1], values[:, :, column : column + 1])}  # (B, H_t, 1, D_t)
            fused = self.fuse(receiver, head, position, attention_mask, inputs, start=last, reads=reads, frame=frame)
            fused_keys, fused_values = fused[layer]
            before, after = slice(None, column), slice(column + 1, None)
            return (
                torch.cat((keys[:, :, before], fused_keys, keys[:, :, after]), dim=2),
                torch.cat((values[:, :, before], fused_values, values[:, :, after]), dim=2),
            )

        return hook


def _plus(own: Tensor, delta: Tensor) -> Tensor:
    """``own + delta`` in ``own``'s dtype. Without autograd it is written into ``own`` (the stacked copy of the
    receiver's cache this fusion made; nothing reads it after); in training the fusers saved it for backward."""
    if torch.is_grad_enabled() and delta.requires_grad:
        return own + delta.to(own.dtype)
    return own.add_(delta)


class _Totals:
    """The sum of every sender's masked deltas over a receiver stack's layers (None until one is added)."""

    def __init__(self, layers: tuple[int, ...]) -> None:
        self.layers = layers
        self.keys: Tensor | None = None  # (L, B, H_t, n, D_t)
        self.values: Tensor | None = None

    @property
    def empty(self) -> bool:
        return self.keys is None and self.values is None

    def add(self, deltas: KVStack) -> None:
        self.keys = self._plus(self.keys, deltas.keys, deltas.layers)
        self.values = self._plus(self.values, deltas.values, deltas.layers)

    def _plus(self, total: Tensor | None, delta: Tensor | None, layers: tuple[int, ...]) -> Tensor | None:
        if delta is None:
            return total
        if layers != self.layers:  # spread over every layer: zero where this sender does not fuse
            slots = slot_index(self.layers, layers, delta.device)
            delta = delta.new_zeros((len(self.layers), *delta.shape[1:])).index_add(0, slots, delta)
        return delta if total is None else total + delta

    def added_to(self, base: KVStack) -> KVStack:
        """``base`` with the totals so far added (what a sequential fuser reads)."""
        keys = base.keys if self.keys is None or base.keys is None else base.keys + self.keys
        return KVStack(base.layers, keys, base.values if self.values is None else base.values + self.values)
