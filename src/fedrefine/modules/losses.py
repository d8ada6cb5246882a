"""The training losses of the fusion modules: cross-entropy of the receiver's response through a fused receiver."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedrefine.fusion import FusedReceiver, FusionBatch
from fedrefine.message import KVMessage


def response_loss(model: FusedReceiver, batch: FusionBatch, senders: Sequence[str] | None = None) -> Tensor:
    """Mean next-token cross-entropy over the response tokens only (every token of the batch weighs the same)."""
    logits = model(batch, senders=senders)[:, :-1]  # (B, R, V): the logits that predict each response token
    mask = batch.response_mask.bool()
    return torch.nn.functional.cross_entropy(logits[mask].float(), batch.response_ids[mask])


def response_losses(
    model: FusedReceiver, batch: FusionBatch, senders: Sequence[str] | None = None,
    kv_messages: Mapping[str, KVMessage] | None = None,
) -> Tensor:
    """(B,) each sample's mean next-token cross-entropy over its response tokens (``senders=[]``: the receiver
    alone; ``kv_messages``: messages already sent)."""
    logits = model(batch, senders=senders, kv_messages=kv_messages)[:, :-1].float()  # (B, R, V)
    mask = batch.response_mask.to(logits.dtype)  # (B, R)
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.response_ids, reduction="none")  # (B, R)
    return (losses * mask).sum(1) / mask.sum(1).clamp(min=1.0)
