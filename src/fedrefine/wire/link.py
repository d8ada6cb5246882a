"""A sender -> receiver link: which codec a sender's K/V travel in, how many layers it sends, and the
round trip through the wire format that the receiver's fusers then read."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch

from fedrefine.settings import SettingsError, documented
from fedrefine.wire.codecs import CODEC_NAMES, codec_by_name
from fedrefine.wire.format import (
    MAX_DECODED_BYTES,
    MAX_MESSAGE_BYTES,
    MessageRequest,
    deserialize_message,
    serialize_message,
)
from fedrefine.wire.message import KVMessage


@documented
@dataclass
class LinkConfig:
    """How senders' K/V messages travel to the receiver (codec, layer budget, limits)."""

    codec: str | None = field(
        default=None,
        metadata={"help": f"Codec of every link: one of {', '.join(CODEC_NAMES)} (messages are serialised and "
                          f"decoded, and bytes are the wire size, header included); None: in-process tensors, "
                          f"bytes counted from shapes."},
    )
    per_sender: dict[str, str] = field(
        default_factory=dict, metadata={"help": "Codec per sender name, overriding `codec` for those links."}
    )
    group_size: int = field(
        default=128, metadata={"help": "Quantisation group: tokens per key group, channels per value group."}
    )
    layer_budget: float | None = field(
        default=None,
        metadata={"help": "Share of the layers a fuser reads that are sent, the ones with the largest gate logits "
                          "first (e.g. 0.3; None: all). Fuser layers whose sender layer is not sent are skipped."},
    )
    max_message_bytes: int = field(
        default=MAX_MESSAGE_BYTES, metadata={"help": "A message above this size is refused by the receiver."}
    )
    max_decoded_bytes: int = field(
        default=MAX_DECODED_BYTES,
        metadata={"help": "A message whose header declares K/V above this size once decoded (fp32, full batch) is "
                          "refused before anything is allocated."},
    )
    in_training: bool = field(
        default=False,
        metadata={"help": "Apply the codec and layer budget while training too, so the fuser learns on the K/V it "
                          "will receive (straight-through: the sender's K/V carry no gradient)."},
    )

    def __post_init__(self) -> None:
        for name in [self.codec, *self.per_sender.values()]:
            if name is not None and name not in CODEC_NAMES:
                raise SettingsError(f"Unknown link codec {name!r}; choose one of {list(CODEC_NAMES)} (or None).")
        if self.layer_budget is not None and not 0 < self.layer_budget <= 1:
            raise SettingsError(f"link.layer_budget must be in (0, 1], got {self.layer_budget}.")

    def codec_for(self, sender: str) -> str | None:
        return self.per_sender.get(sender, self.codec)


def budgeted_layers(needed: Sequence[int], importance: dict[int, float], budget: float | None) -> list[int]:
    """The ``ceil(budget * len(needed))`` most important of the ``needed`` sender layers (all without a budget)."""
    if budget is None or not needed:
        return list(needed)
    keep = max(1, math.ceil(budget * len(needed)))
    ranked = sorted(needed, key=lambda j: (-importance.get(j, float("-inf")), j))
    return sorted(ranked[:keep])


def transmit(
    message: KVMessage, codec: str, config: LinkConfig, trained_for: Collection[str] | None = None
) -> KVMessage:
    """Send ``message`` through the wire format and decode it as the receiver does (validated)."""
    data = serialize_message(message, codec_by_name(codec, config.group_size))
    device = next(iter(message.layers.values()))[0].device if message.layers else torch.device("cpu")
    request = MessageRequest.of(list(message.layers), message.attention_mask, message.sent)
    return deserialize_message(data, message.sender, trained_for, config.max_message_bytes, device, request,
                               config.max_decoded_bytes)
