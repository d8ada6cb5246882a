"""The KV message wire format: a :class:`~fedrefine.wire.message.KVMessage` <-> bytes, validated on the way in.

A message is one safetensors blob. Its metadata holds a versioned JSON header: the sender's
identity, the carried layers, the batch shape, the transmitted positions' count, the codec and
its parameters, and the dtype to restore. Its tensors are ``attention_mask`` (B, N) as bits (the
positions follow from it, as the sender computed them), ``sent`` (B, N) as bits when not every
real position travels, and each carried layer's K and V
at the transmitted positions only, flattened to (H, T, D) and coded (``k{layer}.{part}``,
``v{layer}.{part}``). The reported size of a message is the length of these bytes, header included.

Decoding checks everything before anything is fused: size limit, safetensors structure, format
and version, the sender's identity against the one expected (and the ones the receiver's fusers
were trained for), layer indices, shapes, the codec, and the transmitted-position count.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Collection
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from fedrefine.kv.cache import positions_from_mask
from fedrefine.participants import ParticipantIdentity
from fedrefine.wire.codecs import Codec, Role, codec_by_name
from fedrefine.wire.message import KVMessage

FORMAT_NAME = "fedrefine.kv_message"
FORMAT_VERSION = 1
#: Default refusal size: far above any real message (Llama-3.2-1B at 8k tokens in fp32 is ~1 GB).
MAX_MESSAGE_BYTES = 2**31
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class WireFormatError(ValueError):
    """A message that is not what its sender or its receiver expects; never fused."""


def serialize_message(message: KVMessage, codec: Codec) -> bytes:
    """The message's bytes: header plus coded K/V at the transmitted positions."""
    mask = message.attention_mask if message.sent is None else message.sent  # (B, N)
    flat = mask.reshape(-1).bool().cpu()  # (B * N,)
    if not torch.equal(message.positions.cpu(), positions_from_mask(message.attention_mask).cpu()):
        raise WireFormatError(f"Message from {message.sender.name_or_path}: positions must follow its attention mask.")
    tensors: dict[str, Tensor] = {"attention_mask": pack_bits(message.attention_mask)}  # positions follow from it
    if message.sent is not None:
        tensors["sent"] = pack_bits(message.sent)
    dtype = None
    for layer, (keys, values) in message.layers.items():
        dtype = keys.dtype
        for prefix, states, role in (("k", keys, "key"), ("v", values, "value")):
            picked = transmitted(states, flat)  # (H, T, D)
            for part, tensor in codec.compress(picked, role).items():
                tensors[f"{prefix}{layer}.{part}"] = tensor
    batch, length = message.attention_mask.shape
    header = {
        "sender": message.sender.to_dict(),
        "layers": sorted(message.layers),
        "batch": batch,
        "length": length,
        "transmitted": int(flat.sum()),
        "codec": {"name": codec.name, **codec.params()},
        "dtype": str(dtype or torch.float32).removeprefix("torch."),
    }
    metadata = {"format": FORMAT_NAME, "version": str(FORMAT_VERSION), "header": json.dumps(header, sort_keys=True)}
    return save_tensors(tensors, metadata=metadata)


def pack_bits(mask: Tensor) -> Tensor:
    """A (B, N) 0/1 mask as bits, eight positions per byte."""
    return torch.from_numpy(np.packbits(mask.detach().cpu().bool().numpy().reshape(-1)))


def unpack_bits(packed: Tensor, shape: tuple[int, int]) -> Tensor:
    count = shape[0] * shape[1]
    if packed.dtype != torch.uint8 or packed.numel() != (count + 7) // 8:
        raise ValueError(f"expected {(count + 7) // 8} mask bytes, got {packed.numel()} of {packed.dtype}")
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=count).reshape(shape).astype(bool))


def transmitted(states: Tensor, flat_mask: Tensor) -> Tensor:
    """(B, H, N, D) -> (H, T, D): the transmitted positions of every sample, in order."""
    heads, dim = states.shape[1], states.shape[3]
    return states.detach().cpu().permute(1, 0, 2, 3).reshape(heads, -1, dim)[:, flat_mask]


def deserialize_message(
    data: bytes,
    expected: ParticipantIdentity,
    trained_for: Collection[str] | None = None,
    max_bytes: int = MAX_MESSAGE_BYTES,
    device: torch.device | str = "cpu",
) -> KVMessage:
    """The :class:`KVMessage` in ``data``, from the sender ``expected`` to be; anything else is refused.

    ``trained_for``: identity keys of the senders the receiver's fusers were trained for (None: not
    checked). The result's ``wire_bytes`` is ``len(data)``.
    """
    name = expected.name_or_path
    if len(data) > max_bytes:
        raise WireFormatError(f"Message from {name} is {len(data):,} bytes, over the limit of {max_bytes:,}; refused.")
    metadata = read_metadata(data, name)
    if metadata.get("format") != FORMAT_NAME or metadata.get("version") != str(FORMAT_VERSION):
        raise WireFormatError(
            f"Message from {name} is format {metadata.get('format')!r} version {metadata.get('version')!r}; this "
            f"receiver reads {FORMAT_NAME} version {FORMAT_VERSION}. Run the same FedRefine version on both ends."
        )
    try:
        header = json.loads(metadata["header"])
        sender = ParticipantIdentity.from_dict(header["sender"])
    except (KeyError, TypeError, ValueError) as err:
        raise WireFormatError(f"Message from {name} has an unreadable header ({err}).") from None
    if sender != expected:
        raise WireFormatError(f"Message claims to come from {sender.key}, but this link's sender is {expected.key}; refused.")
    if trained_for is not None and sender.key not in trained_for:
        raise WireFormatError(f"No fuser of this receiver was trained for sender {sender.key}; its message is refused.")
    try:
        tensors = load_tensors(data)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise WireFormatError(f"Message from {name} is truncated or corrupted ({err}).") from None
    return assemble(tensors, header, sender, len(data), device)


def read_metadata(data: bytes, name: str) -> dict[str, str]:
    """The safetensors metadata of ``data``, checking the header's own length first (truncation)."""
    if len(data) < 8:
        raise WireFormatError(f"Message from {name} is {len(data)} bytes: truncated before its header.")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise WireFormatError(f"Message from {name} is truncated: its header says {size:,} bytes, {len(data) - 8:,} follow.")
    try:
        return json.loads(data[8 : 8 + size]).get("__metadata__") or {}
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise WireFormatError(f"Message from {name} has a corrupted header ({err}).") from None


def assemble(
    tensors: dict[str, Tensor], header: dict[str, Any], sender: ParticipantIdentity, size: int, device: torch.device | str
) -> KVMessage:
    """Check the decoded tensors against the header and the sender's identity; scatter K/V back to (B, H, N, D)."""
    name = sender.name_or_path

    def refuse(problem: str) -> WireFormatError:
        return WireFormatError(f"Message from {name} is malformed: {problem}; refused.")

    batch, length, count = header.get("batch"), header.get("length"), header.get("transmitted")
    if not all(isinstance(v, int) and v >= 0 for v in (batch, length, count)):
        raise refuse(f"batch, length and transmitted must be counts, got {batch}, {length}, {count}")
    masks = {}
    for key in ("attention_mask", "sent"):
        if key in tensors:
            try:
                masks[key] = unpack_bits(tensors[key], (batch, length))
            except ValueError as err:
                raise refuse(f"{key}: {err}") from None
    if "attention_mask" not in masks:
        raise refuse("attention_mask is missing")
    mask, sent = masks["attention_mask"], masks.get("sent")
    flat = (mask if sent is None else sent).reshape(-1)
    if int(flat.sum()) != count:
        raise refuse(f"the header says {count} transmitted positions, the masks {int(flat.sum())}")
    try:
        codec = codec_by_name(header["codec"]["name"], **{k: v for k, v in header["codec"].items() if k != "name"})
        dtype = _DTYPES[header["dtype"]]
    except (KeyError, TypeError, ValueError) as err:
        raise refuse(f"unknown codec or dtype ({err})") from None
    layers = header.get("layers") or []
    if any(not isinstance(j, int) or not 0 <= j < sender.num_layers for j in layers):
        raise refuse(f"layers {layers} are not layers of a {sender.num_layers}-layer sender")
    heads, dim = sender.num_kv_heads, sender.head_dim
    decoded: dict[int, tuple[Tensor, Tensor]] = {}
    for layer in layers:
        pair = []
        for prefix, role in (("k", "key"), ("v", "value")):
            pair.append(decompress_states(tensors, f"{prefix}{layer}.", codec, role, (heads, count, dim), refuse))
        decoded[layer] = tuple(scatter(t, flat, batch, length).to(device, dtype) for t in pair)
    return KVMessage(
        sender=sender,
        layers=decoded,
        positions=positions_from_mask(mask.long()).to(device),
        attention_mask=mask.long().to(device),
        sent=None if sent is None else sent.long().to(device),
        wire_bytes=size,
    )


def decompress_states(tensors: dict[str, Tensor], prefix: str, codec: Codec, role: Role, shape: tuple[int, int, int], refuse) -> Tensor:
    parts = {key[len(prefix) :]: t for key, t in tensors.items() if key.startswith(prefix)}
    if not parts:
        raise refuse(f"layer tensors {prefix}* are missing")
    try:
        states = codec.decompress(parts, shape, role)
    except (KeyError, RuntimeError, ValueError) as err:
        raise refuse(f"{prefix}* do not decode to {shape} with codec {codec.name} ({err})") from None
    if tuple(states.shape) != shape:
        raise refuse(f"{prefix}* decode to {tuple(states.shape)}, expected {shape}")
    return states


def scatter(states: Tensor, flat_mask: Tensor, batch: int, length: int) -> Tensor:
    """(H, T, D) at the transmitted positions -> (B, H, N, D), zeros elsewhere (never read by a fuser)."""
    heads, _, dim = states.shape
    full = torch.zeros(heads, batch * length, dim, dtype=states.dtype)
    full[:, flat_mask] = states
    return full.view(heads, batch, length, dim).permute(1, 0, 2, 3).contiguous()
