"""A sender's transmitted K/V as the fusers read it: taken out of the sender's rotary frame."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fedrefine.cache import LayerKV
from fedrefine.message import KVMessage
from fedrefine.participants import Participant
from fedrefine.rope import RotaryFrame


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

    def unrotated(self, dtype: torch.dtype, index: Tensor | None = None) -> list[LayerKV | None]:
        """Per sender layer: position-free (K, V) in ``dtype``, or None for layers not carried.

        With ``index`` (B, M) only those sender columns, in that order (e.g. the column each
        receiver token is aligned to): each layer's K/V become (B, H_s, M, D_s).
        """
        positions = self.message.positions if index is None else self.message.positions.gather(1, index)  # (B, M)
        frame = RotaryFrame(self.sender.rotary_embedding, positions)
        layers: list[LayerKV | None] = [None] * self.sender.identity.num_layers
        for j, kv in self.message.layers.items():
            if index is not None:  # (B, H_s, N_s, D_s) -> (B, H_s, M, D_s)
                kv = [t.gather(2, index[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])) for t in kv]
            layers[j] = (frame.unrotate(kv[0]).to(dtype), kv[1].to(dtype))
        return layers
