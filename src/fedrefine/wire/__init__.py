"""KV messages on the wire: codecs (casts, KIVI-style grouped quantisation), the versioned format, links."""

from fedrefine.wire.codecs import CODEC_NAMES, Codec, codec_by_name
from fedrefine.wire.format import WireFormatError, deserialize_message, serialize_message
from fedrefine.wire.link import LinkConfig, budgeted_layers, transmit
from fedrefine.wire.remote import (
    DROP_REASONS,
    Delivery,
    HintDelivery,
    RemoteSender,
    RemoteSource,
    SenderUnavailable,
)

__all__ = [
    "CODEC_NAMES", "DROP_REASONS", "Codec", "Delivery", "HintDelivery", "LinkConfig", "RemoteSender", "RemoteSource",
    "SenderUnavailable", "WireFormatError", "budgeted_layers", "codec_by_name", "deserialize_message", "serialize_message",
    "transmit",
]
