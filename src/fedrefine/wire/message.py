"""KVMessage: what a sender transmits, and its exact size."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fedrefine.kv.cache import (
    LayerKV,
    cache_to_layers,
    kv_bytes_per_token,
    positions_from_mask,
    returned_cache,
)
from fedrefine.participants import Participant, ParticipantIdentity


@dataclass(frozen=True)
class KVMessage:
    """Per-layer K/V of one sender's prefill of a (padded) batch of prompts.

    Only the layers some receiver fuser reads are carried. Keys are as the sender cached
    them (with the sender's rotary embedding at ``positions``). ``sent`` (B, N) marks the
    positions a fuser reads, hence transmitted (None: every real position).
    """

    sender: ParticipantIdentity
    layers: dict[int, LayerKV]  # sender layer -> (K, V), each (B, H_s, N, D_s)
    positions: Tensor  # (B, N)
    attention_mask: Tensor  # (B, N)
    sent: Tensor | None = None  # (B, N)
    wire_bytes: int | None = None  # its serialised size, header included, once it went through a link

    @property
    def tokens_per_sample(self) -> Tensor:
        """Real (unpadded) tokens of each sample, shape (B,)."""
        return self.attention_mask.sum(-1)

    @property
    def transmitted_positions(self) -> int:
        return int((self.attention_mask if self.sent is None else self.sent).sum())

    @property
    def bytes_per_token(self) -> float:
        """Bytes per transmitted position: the serialised size spread over them once sent over a link, else
        the carried layers' K and V for one token in memory."""
        if self.wire_bytes is not None:
            return self.wire_bytes / max(1, self.transmitted_positions)
        return kv_bytes_per_token(list(self.layers.values()))

    @property
    def nbytes(self) -> int:
        """Exact bytes sent: the serialised size over a link, else the carried K/V at the transmitted positions."""
        if self.wire_bytes is not None:
            return self.wire_bytes
        return kv_bytes_per_token(list(self.layers.values())) * self.transmitted_positions


@torch.no_grad()
def prefill_message(
    sender: Participant,
    input_ids: Tensor,
    attention_mask: Tensor,
    layers: list[int] | None = None,
    sent: Tensor | None = None,
) -> KVMessage:
    """Run the sender's prefill over its own left-padded tokens (B, N) and package the needed layers.

    ``layers``: the sender layers to carry (None: all); ``sent`` (B, N): the positions transmitted
    (None: every real position).
    """
    positions = positions_from_mask(attention_mask)  # (B, N)
    output = sender.model(  # only the cache is sent: logits for one position, not the whole vocabulary at every one
        input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True, logits_to_keep=1
    )
    cache = cache_to_layers(returned_cache(output))
    wanted = range(len(cache)) if layers is None else layers
    return KVMessage(
        sender=sender.identity,
        layers={j: cache[j] for j in wanted},
        positions=positions,
        attention_mask=attention_mask,
        sent=sent,
    )


def random_message_like(message: KVMessage, generator: torch.Generator | None = None) -> KVMessage:
    """A message of the same shape whose K/V are Gaussian with each layer's own mean and std (a control)."""
    layers = {}
    for j, (keys, values) in message.layers.items():
        fake = []
        for states in (keys, values):
            noise = torch.randn(states.shape, generator=generator, dtype=torch.float32).to(states.device)
            fake.append((noise * states.float().std() + states.float().mean()).to(states.dtype))
        layers[j] = (fake[0], fake[1])
    return KVMessage(message.sender, layers, message.positions, message.attention_mask)
