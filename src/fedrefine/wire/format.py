"""The KV message wire format: a :class:`~fedrefine.wire.message.KVMessage` <-> bytes, validated on the way in.

A message is one safetensors blob. Its metadata holds a versioned JSON header: the sender's
identity, the carried layers, the batch shape, the transmitted positions' count, the codec and
its parameters, and the dtype to restore. Its tensors are ``attention_mask`` (B, N) as bits (the
positions follow from it, as the sender computed them), ``sent`` (B, N) as bits when not every
real position travels, and each carried layer's K and V
at the transmitted positions only, flattened to (H, T, D) and coded (``k{layer}.{part}``,
``v{layer}.{part}``). The reported size of a message is the length of these bytes, header included.

Decoding checks everything before anything is fused or even allocated: size limit, safetensors
structure, format and version, the sender's identity against the one expected (and the ones the
receiver's fusers were trained for), the declared batch, width and layers against the receiver's
request (:class:`MessageRequest`) and the decoded-size limit, every tensor's exact name, dtype and
shape (no missing layer, no surplus byte), the codec, the transmitted-position count, and finally
that every decoded value is finite. Any failure is a :class:`WireFormatError` whose ``reason`` the
receiver records when it drops the sender.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from fedrefine.kv.cache import positions_from_mask
from fedrefine.participants import ParticipantIdentity
from fedrefine.wire.codecs import Codec, codec_by_name
from fedrefine.wire.message import KVMessage

FORMAT_NAME = "fedrefine.kv_message"
FORMAT_VERSION = 1
#: Default refusal size: far above any real message (Llama-3.2-1B at 8k tokens in fp32 is ~1 GB).
MAX_MESSAGE_BYTES = 2**31
#: Default limit on what one message may decode to (its K/V scattered to the full batch, in fp32), checked from
#: the header before anything is allocated: a message cannot make its receiver allocate more than this.
MAX_DECODED_BYTES = 2**32
#: Largest quantisation group a header may name.
MAX_GROUP_SIZE = 1 << 20
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class WireFormatError(ValueError):
    """A message that is not what its sender or its receiver expects; never fused.

    ``reason``: why the receiver drops its sender (``invalid_message``, ``missing_layers`` or ``non_finite``).
    """

    def __init__(self, message: str, reason: str = "invalid_message") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class MessageRequest:
    """What the receiver asked for: a message must carry exactly these layers over a (batch, length) batch
    (and, when given, ``transmitted`` positions); anything else is refused before it is decoded."""

    layers: tuple[int, ...]
    batch: int
    length: int
    transmitted: int | None = None

    @classmethod
    def of(cls, layers: Sequence[int], attention_mask: Tensor, sent: Tensor | None = None) -> MessageRequest:
        """The request for ``layers`` of a (B, N) batch with ``attention_mask`` and transmitted ``sent`` (B, N)."""
        batch, length = attention_mask.shape
        return cls(tuple(sorted(layers)), batch, length, int((attention_mask if sent is None else sent).bool().sum()))


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
    request: MessageRequest | None = None,
    max_decoded_bytes: int = MAX_DECODED_BYTES,
) -> KVMessage:
    """The :class:`KVMessage` in ``data``, from the sender ``expected`` to be; anything else is refused.

    ``trained_for``: identity keys of the senders the receiver's fusers were trained for (None: not
    checked); ``request``: what was asked (None: not checked, the decoded-size limit still holds). The
    result's ``wire_bytes`` is ``len(data)``. Every failure is a :class:`WireFormatError`.
    """
    name = expected.name_or_path
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireFormatError(f"Message from {name} is a {type(data).__name__}, not bytes; refused.")
    data = bytes(data)
    if len(data) > max_bytes:
        raise WireFormatError(f"Message from {name} is {len(data):,} bytes, over the limit of {max_bytes:,}; refused.")
    metadata = read_metadata(data, name)
    if metadata.get("format") != FORMAT_NAME or metadata.get("version") != str(FORMAT_VERSION):
        raise WireFormatError(
            f"Message from {name} is format {str(metadata.get('format'))[:40]!r} version "
            f"{str(metadata.get('version'))[:20]!r}; this receiver reads {FORMAT_NAME} version {FORMAT_VERSION}. "
            f"Run the same FedRefine version on both ends."
        )
    try:
        header = json.loads(metadata["header"])
        if not isinstance(header, dict) or not isinstance(header.get("sender"), dict):
            raise TypeError("the header and its sender must be JSON objects")
        sender = ParticipantIdentity.from_dict(header["sender"])
        same = sender == expected
    except (KeyError, TypeError, ValueError, RecursionError) as err:
        raise WireFormatError(f"Message from {name} has an unreadable header ({_short(err)}).") from None
    if not same:
        raise WireFormatError(f"Message claims to come from {_short(sender.key)}, but this link's sender is "
                              f"{expected.key}; refused.")
    if trained_for is not None and sender.key not in trained_for:
        raise WireFormatError(f"No fuser of this receiver was trained for sender {sender.key}; its message is refused.")
    plan = plan_message(header, expected, request, max_decoded_bytes)
    try:
        tensors = load_tensors(data)
    except Exception as err:  # noqa: BLE001 - safetensors raises several types on corrupted input
        raise WireFormatError(f"Message from {name} is truncated or corrupted ({_short(err)}).") from None
    try:
        return assemble(tensors, plan, expected, len(data), device)
    except WireFormatError:
        raise
    except Exception as err:  # noqa: BLE001 - a last guard: no input may end the receiver's run with a raw error
        raise WireFormatError(f"Message from {name} is malformed ({type(err).__name__}: {_short(err)}); refused.") from None


def _short(value: object, limit: int = 200) -> str:
    """``value`` as text of at most ``limit`` characters (a hostile message's text is never echoed whole)."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def read_metadata(data: bytes, name: str) -> dict[str, str]:
    """The safetensors metadata of ``data``, checking the header's own length first (truncation)."""
    if len(data) < 8:
        raise WireFormatError(f"Message from {name} is {len(data)} bytes: truncated before its header.")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise WireFormatError(f"Message from {name} is truncated: its header says {size:,} bytes, {len(data) - 8:,} follow.")
    try:
        metadata = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, RecursionError) as err:
        raise WireFormatError(f"Message from {name} has a corrupted header ({_short(err)}).") from None
    if not isinstance(metadata, dict):
        raise WireFormatError(f"Message from {name} has a corrupted header (its metadata is not an object).")
    return metadata


@dataclass(frozen=True)
class MessagePlan:
    """A header checked against the sender's identity, the request and the limits: what may be decoded."""

    batch: int
    length: int
    transmitted: int
    layers: tuple[int, ...]
    codec: Codec
    dtype: torch.dtype


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def plan_message(
    header: dict[str, Any], sender: ParticipantIdentity, request: MessageRequest | None, max_decoded_bytes: int
) -> MessagePlan:
    """Check every size the header declares, against ``request`` and ``max_decoded_bytes``, before any tensor is
    read or allocated."""
    name = sender.name_or_path

    def refuse(problem: str, reason: str = "invalid_message") -> WireFormatError:
        return WireFormatError(f"Message from {name} is malformed: {problem}; refused.", reason)

    batch, length, count = header.get("batch"), header.get("length"), header.get("transmitted")
    if not all(_count(v) for v in (batch, length, count)):
        raise refuse(f"batch, length and transmitted must be counts, got {_short(batch, 20)}, {_short(length, 20)}, "
                     f"{_short(count, 20)}")
    if count > batch * length:
        raise refuse(f"{count} transmitted positions in a {batch} x {length} batch")
    layers = header.get("layers")
    if not isinstance(layers, list) or not all(_count(j) for j in layers) or len(set(layers)) != len(layers):
        raise refuse(f"layers must be a list of distinct layer indices, got {_short(layers, 60)}")
    if any(j >= sender.num_layers for j in layers):
        raise refuse(f"layers {_short(sorted(layers), 60)} are not layers of a {sender.num_layers}-layer sender")
    if request is not None:
        if (batch, length) != (request.batch, request.length):
            raise refuse(f"it covers a {batch} x {length} batch, the receiver asked for {request.batch} x {request.length}")
        missing = sorted(set(request.layers) - set(layers))
        if missing:
            raise refuse(f"layers {_short(missing, 60)} were asked for and are missing", "missing_layers")
        if set(layers) != set(request.layers):
            raise refuse(f"layers {_short(sorted(set(layers) - set(request.layers)), 60)} were not asked for")
        if request.transmitted is not None and count != request.transmitted:
            raise refuse(f"{count} transmitted positions, the receiver asked for {request.transmitted}")
    decoded = len(layers) * 2 * batch * length * sender.num_kv_heads * sender.head_dim * 4  # fp32 (B, H, N, D) pairs
    if decoded > max_decoded_bytes:
        raise refuse(f"it would decode to {decoded:,} bytes, over the limit of {max_decoded_bytes:,}")
    codec_header = header.get("codec")
    if not isinstance(codec_header, dict) or set(codec_header) - {"name", "group_size"}:
        raise refuse(f"codec must be an object with a name (and group_size), got {_short(codec_header, 60)}")
    group_size = codec_header.get("group_size", 128)
    if not _count(group_size) or not 1 <= group_size <= MAX_GROUP_SIZE:
        raise refuse(f"group_size must be an integer in 1..{MAX_GROUP_SIZE}, got {_short(group_size, 20)}")
    try:
        codec = codec_by_name(str(codec_header.get("name")), group_size)
        dtype = _DTYPES[header.get("dtype")]
    except (KeyError, TypeError, ValueError) as err:
        raise refuse(f"unknown codec or dtype ({_short(err, 80)})") from None
    return MessagePlan(batch, length, count, tuple(sorted(layers)), codec, dtype)


def assemble(tensors: dict[str, Tensor], plan: MessagePlan, sender: ParticipantIdentity, size: int,
             device: torch.device | str) -> KVMessage:
    """Check the decoded tensors against the plan (exact names, dtypes and shapes); scatter K/V back to (B, H, N, D)."""
    name = sender.name_or_path

    def refuse(problem: str, reason: str = "invalid_message") -> WireFormatError:
        return WireFormatError(f"Message from {name} is malformed: {problem}; refused.", reason)

    batch, length, count = plan.batch, plan.length, plan.transmitted
    heads, dim = sender.num_kv_heads, sender.head_dim
    shape = (heads, count, dim)
    wanted = {f"{prefix}{layer}.{part}": spec for layer in plan.layers for prefix, role in (("k", "key"), ("v", "value"))
              for part, spec in plan.codec.part_shapes(shape, role).items()}
    masks = {key for key in ("attention_mask", "sent") if key in tensors}
    decoded_masks = {}
    for key in masks:
        try:
            decoded_masks[key] = unpack_bits(tensors[key], (batch, length))
        except ValueError as err:
            raise refuse(f"{key}: {err}") from None
    if "attention_mask" not in decoded_masks:
        raise refuse("attention_mask is missing")
    mask, sent = decoded_masks["attention_mask"], decoded_masks.get("sent")
    flat = (mask if sent is None else sent).reshape(-1)
    if int(flat.sum()) != count:
        raise refuse(f"the header says {count} transmitted positions, the masks {int(flat.sum())}")
    absent = sorted(key for key in wanted if key not in tensors)
    if absent:
        gone = sorted({int(key.split(".")[0][1:]) for key in absent})
        raise refuse(f"tensors {_short(absent, 80)} are missing: layers {gone} are not all there (a "
                     f"{plan.codec.name} message of layers {list(plan.layers)} carries them)", "missing_layers")
    surplus = sorted(set(tensors) - set(wanted) - masks)
    if surplus:
        raise refuse(f"tensors {_short(surplus, 80)} are not part of the {plan.codec.name} message of layers "
                     f"{list(plan.layers)}")
    for key, (expected_shape, dtype) in wanted.items():
        if (tuple(tensors[key].shape), tensors[key].dtype) != (expected_shape, dtype):
            raise refuse(f"{key} is {tuple(tensors[key].shape)} {tensors[key].dtype}; {expected_shape} {dtype} "
                         f"expected: the tensors do not decode to {shape} with codec {plan.codec.name}")
    decoded: dict[int, tuple[Tensor, Tensor]] = {}
    for layer in plan.layers:
        pair = []
        for prefix, role in (("k", "key"), ("v", "value")):
            parts = {key.split(".", 1)[1]: t for key, t in tensors.items() if key.split(".", 1)[0] == f"{prefix}{layer}"}
            states = plan.codec.decompress(parts, shape, role)
            if tuple(states.shape) != shape:
                raise refuse(f"{prefix}{layer}.* decode to {tuple(states.shape)}, expected {shape}")
            if not bool(torch.isfinite(states).all()):
                raise refuse(f"{prefix}{layer}.* hold non-finite values (NaN or inf)", "non_finite")
            pair.append(states)
        decoded[layer] = tuple(scatter(t, flat, batch, length).to(device, plan.dtype) for t in pair)
    return KVMessage(
        sender=sender,
        layers=decoded,
        positions=positions_from_mask(mask.long()).to(device),
        attention_mask=mask.long().to(device),
        sent=None if sent is None else sent.long().to(device),
        wire_bytes=size,
    )


def scatter(states: Tensor, flat_mask: Tensor, batch: int, length: int) -> Tensor:
    """(H, T, D) at the transmitted positions -> (B, H, N, D), zeros elsewhere (never read by a fuser)."""
    heads, _, dim = states.shape
    full = torch.zeros(heads, batch * length, dim, dtype=states.dtype)
    full[:, flat_mask] = states
    return full.view(heads, batch, length, dim).permute(1, 0, 2, 3).contiguous()
