"""Every open layer fuser of a pair evaluated at once: the layers' weights stacked on a leading layer axis,
one batched matmul per operation instead of one small matmul per layer (what dominates the fuse stage
at batch 1: many small kernels and the Python around them).

The math is the layer fusers' own (RMSNorm, Linear, GELU feed-forward blocks, sigmoid weight head),
so outputs match the per-layer path to float rounding. Used for inference only (no dropout, hard gates,
no autograd); weights are stacked once and re-stacked when any parameter changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

Stacked = tuple[Tensor, Tensor]  # (weight (L, out, in), bias (L, out))


def _linear(layers: Sequence[nn.Linear]) -> Stacked:
    return torch.stack([m.weight for m in layers]), torch.stack([m.bias for m in layers])


def _norm(layers: Sequence[nn.RMSNorm]) -> tuple[Tensor, float | None]:
    return torch.stack([m.weight for m in layers]), layers[0].eps


def linear(x: Tensor, stacked: Stacked) -> Tensor:
    """(L, M, in) -> (L, M, out): each layer's own Linear."""
    weight, bias = stacked
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


def rms_norm(x: Tensor, stacked: tuple[Tensor, float | None]) -> Tensor:
    """(L, M, D) normalised per row, scaled by each layer's own weight (L, D)."""
    weight, eps = stacked
    return F.rms_norm(x, (x.shape[-1],), None, eps) * weight.unsqueeze(1)


@dataclass(frozen=True)
class StackedBlock:
    """A :class:`~fedrefine.fuser.FeedForwardBlock` of every layer: x + W2 GELU(W1 RMSNorm(x))."""

    norm: tuple[Tensor, float | None]
    up: Stacked
    down: Stacked

    @classmethod
    def of(cls, blocks: Sequence[nn.Module]) -> StackedBlock:
        return cls(_norm([b.norm for b in blocks]), _linear([b.up for b in blocks]), _linear([b.down for b in blocks]))

    def __call__(self, x: Tensor) -> Tensor:
        return x + linear(F.gelu(linear(rms_norm(x, self.norm), self.up)), self.down)


@dataclass(frozen=True)
class StackedStream:
    """The K (or V) :class:`~fedrefine.fuser.StreamFuser` of every stacked layer."""

    sender_norm: tuple[Tensor, float | None]
    receiver_norm: tuple[Tensor, float | None] | None
    input: Stacked
    trunk: StackedBlock
    projection_blocks: tuple[StackedBlock, ...]
    projection: Stacked
    weight_block: StackedBlock
    weight_head: Stacked
    heads: int
    head_dim: int

    @classmethod
    def of(cls, streams: Sequence[nn.Module]) -> StackedStream:
        first = streams[0]
        return cls(
            _norm([s.sender_norm for s in streams]),
            None if first.receiver_norm is None else _norm([s.receiver_norm for s in streams]),
            _linear([s.input for s in streams]),
            StackedBlock.of([s.trunk for s in streams]),
            tuple(StackedBlock.of(blocks) for blocks in zip(*(s.projection_blocks for s in streams))),
            _linear([s.projection for s in streams]),
            StackedBlock.of([s.weight_block for s in streams]),
            _linear([s.weight_head for s in streams]),
            first.receiver_heads,
            first.receiver_head_dim,
        )

    def __call__(self, sender: Tensor, receiver: Tensor | None) -> Tensor:
        """(L, B, H_s, N, D_s) [and (L, B, H_t, N, D_t)] -> weighted projections ``w * p`` (L, B, H_t, N, D_t)."""
        layers, batch, _, length, _ = sender.shape
        features = rms_norm(sender.transpose(2, 3).reshape(layers, batch * length, -1), self.sender_norm)  # (L, M, F_s)
        if self.receiver_norm is not None:
            theirs = rms_norm(receiver.transpose(2, 3).reshape(layers, batch * length, -1), self.receiver_norm)
            features = torch.cat((features, theirs), dim=-1)  # (L, M, F_s + F_t)
        h = self.trunk(linear(features, self.input))  # (L, M, hidden)
        p = h
        for block in self.projection_blocks:
            p = block(p)
        p = linear(p, self.projection).view(layers, batch, length, self.heads, self.head_dim)
        w = torch.sigmoid(linear(self.weight_block(h), self.weight_head)).view(layers, batch, length, self.heads, 1)
        return (w * p).transpose(2, 3)  # (L, B, H_t, N, D_t)


@dataclass(frozen=True)
class StackedLayers:
    """The open layer fusers of a pair, stacked: their indices, and their K (if fused) and V streams."""

    indices: tuple[int, ...]
    key: StackedStream | None
    value: StackedStream
    versions: tuple[tuple[int, int], ...]  # each parameter's (storage, version) when stacked: a change re-stacks

    @classmethod
    def of(cls, layers: Sequence[nn.Module], indices: Sequence[int], versions: tuple[tuple[int, int], ...]) -> StackedLayers:
        with torch.no_grad():
            chosen = [layers[i] for i in indices]
            key = None if chosen[0].key is None else StackedStream.of([layer.key for layer in chosen])
            return cls(tuple(indices), key, StackedStream.of([layer.value for layer in chosen]), versions)
