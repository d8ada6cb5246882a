"""KVMessage: what a sender transmits, and its exact size."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fedrefine.cache import (
    LayerKV,
    cache_to_layers,
    kv_bytes_per_token,
    positions_from_mask,
    returned_cache,
)
from fedrefine.participants import Participant, ParticipantIdentity


@dataclass
class KVMessage:
    """Per-layer K/V of one sender's prefill of a (padded) batch of prompts.

    Only the layers some receiver fuser reads are carried. Keys are as the sender cached
    them (with the sender's rotary embedding at ``positions``). ``sent`` (B, N) marks the
    positions a fuser reads, hence transmitted (None: every real position).
    """

    sender: ParticipantIdentity
    layers: dict[int, LayerKV]
    positions: Tensor
    attention_mask: Tensor
    sent: Tensor | None = None

    @property
    def tokens_per_sample(self) -> Tensor:
        """Real (unpadded) tokens of each sample, shape (B,)."""
        return self.attention_mask.sum(-1)

    @property
    def bytes_per_token(self) -> int:
        """Bytes of the carried layers' K and V for one token."""
        return kv_bytes_per_token(list(self.layers.values()))

    @property
    def nbytes(self) -> int:
        """Exact payload in bytes: the carried layers' K/V at the transmitted positions of every sample."""
        sent = self.attention_mask if self.sent is None else self.sent
        return self.bytes_per_token * int(sent.sum())


@torch.no_grad()
def prefill_message(
    sender: Participant, input_ids: Tensor, attention_mask: Tensor, layers: list[int] | None = None
) -> KVMessage:
    """Run the sender's prefill over its own (left-padded) tokens and package the needed layers."""
    positions = positions_from_mask(attention_mask)
    output = sender.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True)
    cache = cache_to_layers(returned_cache(output))
    wanted = range(len(cache)) if layers is None else layers
    return KVMessage(
        sender=sender.identity,
        layers={j: cache[j] for j in wanted},
        positions=positions,
        attention_mask=attention_mask,
    )
