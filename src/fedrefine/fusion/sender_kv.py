"""A sender's transmitted K/V as the fusers read it: taken out of the sender's rotary frame."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fedrefine.kv.rope import RotaryFrame
from fedrefine.kv.stack import KVStack
from fedrefine.participants import Participant
from fedrefine.wire.message import KVMessage


@dataclass(frozen=True)
class SenderKV:
    """One sender's :class:`KVMessage` with what it takes to read it: the sender's rotary embedding and depth.

    Args:
        sender: the participant that sent ``message``.
        message: its carried layers, keys rotated at ``message.positions`` by the sender's RoPE.
    """

    sender: Participant
    message: KVMessage

    @property
    def attention_mask(self) -> Tensor:
        return self.message.attention_mask  # (B, N_s)

    def unrotated(self, dtype: torch.dtype, index: Tensor | None = None, keys: bool = True) -> KVStack:
        """The carried sender layers, position-free, in ``dtype``: K/V each (J, B, H_s, N_s, D_s).

        With ``index`` (B, M) only those sender columns, in that order (e.g. the column each
        receiver token is aligned to): (J, B, H_s, M, D_s). ``keys=False`` leaves the keys out
        (a fuser that fuses values only reads none).
        """
        positions = self.message.positions if index is None else self.message.positions.gather(1, index)  # (B, M)
        frame = RotaryFrame(self.sender.rotary_embedding, positions)
        return self._carried(index, keys).map(lambda k: frame.unrotate(k).to(dtype), lambda v: v.to(dtype))

    def as_cached(self, dtype: torch.dtype, index: Tensor | None = None, keys: bool = True) -> KVStack:
        """:meth:`unrotated`'s layers and columns with the keys as the sender's cache holds them (rotated at the
        sender's positions): what the C2C reference's projectors read."""
        return self._carried(index, keys).map(lambda k: k.to(dtype), lambda v: v.to(dtype))

    def _carried(self, index: Tensor | None, keys: bool) -> KVStack:
        carried = KVStack.of(self.message.layers, keys=keys)  # (J, B, H_s, N_s, D_s)
        if index is None:
            return carried

        def columns(t: Tensor) -> Tensor:  # (J, B, H_s, N_s, D_s) -> (J, B, H_s, M, D_s)
            return t.gather(3, index[None, :, None, :, None].expand(t.shape[0], -1, t.shape[2], -1, t.shape[4]))

        return carried.map(columns, columns)
