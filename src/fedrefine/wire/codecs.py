"""How a sender's K/V tensors become bytes: casts (fp32 / bf16 / fp16) and grouped integer quantisation.

Quantisation follows KIVI's layout: keys are quantised **per channel** (one scale per channel and
group of ``group_size`` tokens: key outliers live in fixed channels), values **per token** (one
scale per token and group of ``group_size`` channels). Scales are symmetric (absmax) and stored
as fp16; integers are stored offset to unsigned and packed (two 4-bit or four 2-bit codes per byte).
A codec is chosen once per link, by name (:data:`CODEC_NAMES`), as a strategy object.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Literal

import torch
from torch import Tensor

#: Which of a layer's tensors is being coded: keys (per-channel groups) or values (per-token groups).
Role = Literal["key", "value"]
CODEC_NAMES: tuple[str, ...] = ("fp32", "bf16", "fp16", "int8", "int4", "int2")
_CAST_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Codec(ABC):
    """Encodes one (H, T, D) tensor (heads, transmitted tokens, head dim) into named parts, and back."""

    name: str

    @abstractmethod
    def compress(self, states: Tensor, role: Role) -> dict[str, Tensor]:
        """The parts that travel (contiguous CPU tensors)."""

    @abstractmethod
    def decompress(self, parts: dict[str, Tensor], shape: tuple[int, int, int], role: Role) -> Tensor:
        """The (H, T, D) float tensor the parts stand for."""

    @abstractmethod
    def part_shapes(self, shape: tuple[int, int, int], role: Role) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Each part's exact (shape, dtype) for an (H, T, D) tensor: a received message is checked against them
        before anything is decoded (no surplus bytes, no declared size beyond what was asked)."""

    @property
    def lossless(self) -> bool:
        return False

    def params(self) -> dict[str, Any]:
        """What the header records besides the name (enough to decode)."""
        return {}

    def round_trip(self, states: Tensor, role: Role) -> Tensor:
        """``decompress(compress(states))`` in ``states``' dtype and device: what the receiver's fuser reads."""
        shape = tuple(states.shape)
        return self.decompress(self.compress(states, role), shape, role).to(states.device, states.dtype)


class CastCodec(Codec):
    """The tensors in another float dtype (``fp32`` is exact for fp32 senders, ``bf16``/``fp16`` halve it)."""

    def __init__(self, name: str) -> None:
        self.name, self.dtype = name, _CAST_DTYPES[name]

    def compress(self, states: Tensor, role: Role) -> dict[str, Tensor]:
        return {"data": states.detach().to("cpu", self.dtype).contiguous()}

    def decompress(self, parts: dict[str, Tensor], shape: tuple[int, int, int], role: Role) -> Tensor:
        return parts["data"].reshape(shape).float()

    def part_shapes(self, shape: tuple[int, int, int], role: Role) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"data": (tuple(shape), self.dtype)}

    @property
    def lossless(self) -> bool:
        return self.name == "fp32"


class GroupedQuantCodec(Codec):
    """Symmetric ``bits``-bit integers with fp16 scales, KIVI layout (see the module docstring).

    Args:
        bits: 8, 4 or 2 (2-bit codes are ternary: -1, 0, +1 times the scale).
        group_size: tokens per key group (per channel), channels per value group (per token).
    """

    def __init__(self, bits: int, group_size: int = 128) -> None:
        if bits not in (8, 4, 2):
            raise ValueError(f"Quantisation needs 8, 4 or 2 bits, got {bits}.")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}.")
        self.bits, self.group_size, self.name = bits, group_size, f"int{bits}"
        self.qmax = 2 ** (bits - 1) - 1

    def params(self) -> dict[str, Any]:
        return {"group_size": self.group_size}

    def group(self, shape: tuple[int, int, int], role: Role) -> int:
        """Group length along a row: ``group_size``, or the whole row when it is shorter."""
        heads, tokens, dim = shape
        return max(1, min(self.group_size, tokens if role == "key" else heads * dim))

    def part_shapes(self, shape: tuple[int, int, int], role: Role) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        heads, tokens, dim = shape
        rows, row_length = (heads * dim, tokens) if role == "key" else (tokens, heads * dim)
        group = self.group(shape, role)
        groups = -(-row_length // group)
        codes = rows * groups * group  # (R, G, S) codes, packed
        return {"codes": ((-(-codes * self.bits // 8),), torch.uint8), "scale": ((rows, groups), torch.float16)}

    def _grouped(self, states: Tensor, role: Role) -> Tensor:
        """(rows, groups, group) view to scale over, zero-padded to whole groups."""
        heads, tokens, dim = states.shape
        if role == "key":  # per channel: groups of tokens -> (H * D, T) rows
            rows = states.permute(0, 2, 1).reshape(heads * dim, tokens)
        else:  # per token: groups of channels -> (T, H * D) rows
            rows = states.permute(1, 0, 2).reshape(tokens, heads * dim)
        group = self.group(tuple(states.shape), role)
        rows = torch.nn.functional.pad(rows, (0, (-rows.shape[1]) % group))
        return rows.view(rows.shape[0], -1, group)  # (R, G, group)

    def compress(self, states: Tensor, role: Role) -> dict[str, Tensor]:
        grouped = self._grouped(states.detach().float().cpu(), role)  # (R, G, S)
        scale = (grouped.abs().amax(-1, keepdim=True) / self.qmax).to(torch.float16)  # (R, G, 1)
        safe = scale.float().clamp(min=torch.finfo(torch.float16).tiny)
        codes = (grouped / safe).round().clamp(-self.qmax, self.qmax) + self.qmax  # (R, G, S) in 0 .. 2 * qmax
        return {"codes": pack(codes.to(torch.uint8).flatten(), self.bits), "scale": scale.squeeze(-1).contiguous()}

    def decompress(self, parts: dict[str, Tensor], shape: tuple[int, int, int], role: Role) -> Tensor:
        heads, tokens, dim = shape
        group = self.group(shape, role)
        scale = parts["scale"].float().unsqueeze(-1)  # (R, G, 1)
        count = scale.shape[0] * scale.shape[1] * group
        codes = unpack(parts["codes"], self.bits, count).view(scale.shape[0], scale.shape[1], group)
        rows = ((codes.float() - self.qmax) * scale).flatten(1)  # (R, G * S)
        if role == "key":
            return rows[:, :tokens].reshape(heads, dim, tokens).permute(0, 2, 1)
        return rows[:, : heads * dim].reshape(tokens, heads, dim).permute(1, 0, 2)


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack unsigned ``bits``-bit codes (1-D uint8) into bytes, little end first."""
    if bits == 8:
        return codes.contiguous()
    per_byte = 8 // bits
    codes = torch.nn.functional.pad(codes, (0, (-codes.numel()) % per_byte)).view(-1, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.uint8) * bits
    return (codes << shifts).sum(-1, dtype=torch.int32).to(torch.uint8)  # disjoint bits: the sum is an OR


def unpack(packed: Tensor, bits: int, count: int) -> Tensor:
    """The first ``count`` codes of :func:`pack`'s bytes."""
    if bits == 8:
        return packed[:count]
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.uint8) * bits
    codes = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)  # (bytes, per_byte)
    return codes.flatten()[:count]


def codec_by_name(name: str, group_size: int = 128) -> Codec:
    """The codec called ``name`` (one of :data:`CODEC_NAMES`)."""
    if name in _CAST_DTYPES:
        return CastCodec(name)
    if name in ("int8", "int4", "int2"):
        return GroupedQuantCodec(int(name[3:]), group_size)
    raise ValueError(f"Unknown codec {name!r}; choose one of {list(CODEC_NAMES)}.")
