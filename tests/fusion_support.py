"""Calls the tests share on a fused receiver."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from fedrefine.fusion import FusedReceiver, FusionBatch
from fedrefine.wire import LinkConfig


def fused_logits(
    model: FusedReceiver, batch: FusionBatch, senders: Sequence[str] | None = None, link: LinkConfig | None = None
) -> Tensor:
    """Receiver logits (B, 1 + R, V) over the prompt fused with ``senders`` (default: every sender of the batch),
    each sending once over ``link``."""
    sent = model.send(batch, senders, link)
    return model(batch, sent.messages, sent.own).logits


def fused_cache(model: FusedReceiver, batch: FusionBatch, senders: Sequence[str] | None = None):
    """The receiver's context cache fused with ``senders`` (default: every sender; ``[]``: the receiver alone)."""
    return model.fuse(batch, model.send(batch, senders).messages).context.cache
