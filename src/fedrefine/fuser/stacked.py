"""Every open layer fuser of a pair evaluated at once: the layers' weights stacked on a leading layer axis,
one batched matmul per operation instead of one small matmul per layer (what dominates the fuse stage
at batch 1: many small kernels and the Python around them).

The math is the layer fusers' own (RMSNorm, Linear, GELU feed-forward blocks, sigmoid weight head),
so outputs match the per-layer path to float rounding. Used for inference only (no dropout, hard gates,
no autograd); weights are stacked once and re-stacked when any parameter changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, is_dataclass, replace

import torch
from torch import Tensor, nn
from torch.nn import functional as F

Stacked = tuple[Tensor, Tensor]  # (weight (L, in, out), bias (L, 1, out)): each layer's Linear, transposed once


def _linear(layers: Sequence[nn.Linear], norms: Sequence[nn.RMSNorm] | None = None, columns: slice = slice(None)) -> Stacked:
    """Each layer's Linear (its input ``columns``), with the scale of the RMSNorm before it folded in:
    ``W (g * x) = (W diag(g)) x``, so the normalised input needs no multiply of its own."""
    weight = torch.stack([m.weight[:, columns] for m in layers])  # (L, out, in)
    if norms is not None:
        weight = weight * torch.stack([n.weight for n in norms]).unsqueeze(1)
    if layers[0].bias is None:  # a bias-free Linear (the C2C reference's blocks)
        return weight.transpose(1, 2).contiguous(), weight.new_zeros((weight.shape[0], 1, weight.shape[1]))
    return weight.transpose(1, 2).contiguous(), torch.stack([m.bias for m in layers]).unsqueeze(1)


def linear(x: Tensor, stacked: Stacked) -> Tensor:
    """(L, M, in) -> (L, M, out): each layer's own Linear."""
    weight, bias = stacked
    return torch.baddbmm(bias, x, weight)


def inverse_rms(x: Tensor, eps: float | None) -> Tensor:
    """(L, M, D) -> (L, M, 1): each row's ``1 / sqrt(mean(x^2) + eps)``, RMSNorm's factor (eps as nn.RMSNorm's:
    the dtype's machine epsilon when None)."""
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()


#: At most this many rows per layer (one fused token), the projection's bias is added by its own product: the ones
#: column that saves a pass over many rows costs a copy of its own there.
FEW_ROWS = 8


def normalised_product(x: Tensor, eps: float | None, weight: Tensor, normalised: bool = True, bias: Tensor | None = None) -> Tensor:
    """``RMSNorm(x) @ weight (+ bias)`` (L, M, out) with the norm's scale folded into ``weight``: the row factor is
    applied to the product, so no normalised copy of ``x`` is made (the product is the narrower when the
    input is the receiver's heads side by side). ``normalised=False``: plain ``x @ weight``. ``bias`` (L, 1, out)
    or (L, M, out) is added."""
    if not normalised:
        return torch.bmm(x, weight) if bias is None else torch.baddbmm(bias, x, weight)
    if bias is None:
        return torch.bmm(x, weight).mul_(inverse_rms(x, eps))
    return torch.addcmul(bias, torch.bmm(x, weight), inverse_rms(x, eps))


def rows(states: Tensor) -> Tensor:
    """(L, B, H, N, D) cache states -> (L, B * N, H * D): one row per token, heads side by side."""
    layers, batch, _, length, _ = states.shape
    return states.transpose(2, 3).reshape(layers, batch * length, -1)


def _with_bias(stacked: Stacked) -> tuple[Stacked, Tensor]:
    """A stacked Linear as (weight, bias) views of one (L, in + 1, out) tensor, the bias its last input row."""
    weight, bias = stacked
    both = torch.cat((weight, bias), dim=1)
    return (both[:, :-1], both[:, -1:]), both


@dataclass(frozen=True)
class StackedBlock:
    """A :class:`~fedrefine.fuser.FeedForwardBlock` of every layer: x + W2 GELU(W1 RMSNorm(x))."""

    eps: float | None
    up: Stacked  # the norm's scale folded in
    down: Stacked

    @classmethod
    def of(cls, blocks: Sequence[nn.Module]) -> StackedBlock:
        norms = [b.norm for b in blocks]
        return cls(norms[0].eps, _linear([b.up for b in blocks], norms), _linear([b.down for b in blocks]))

    def __call__(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """(L, M, dim) -> (L, M, dim), into ``out`` when given."""
        weight, bias = self.up
        return self.finish(x, F.gelu(normalised_product(x, self.eps, weight, bias=bias)), out)

    def finish(self, x: Tensor, inner: Tensor, out: Tensor | None = None) -> Tensor:
        """``x + W2 inner``: the block after its GELU (``inner`` (L, M, inner_dim)), into ``out`` when given."""
        return torch.add(linear(inner, self.down), x, out=out)


def shared_up(first: StackedBlock, second: StackedBlock) -> Stacked | None:
    """Two blocks reading the same input, their up Linears side by side (L, dim, inner + inner'): the norms' scales are
    folded into the weights, so one norm factor, one product and one GELU serve both. None when their norms differ
    in eps (then each runs its own)."""
    if first.eps != second.eps:
        return None
    return torch.cat((first.up[0], second.up[0]), dim=-1), torch.cat((first.up[1], second.up[1]), dim=-1)


@dataclass(frozen=True)
class StackedStream:
    """The K (or V) :class:`~fedrefine.fuser.StreamFuser` of every stacked layer.

    The input Linear reads ``[RMSNorm(sender) ; RMSNorm(receiver)]`` (``[sender ; receiver]`` when
    ``normalised`` is False: the C2C reference's streams); it is kept as its two column blocks, summed into one
    output, so the two halves are never concatenated.
    """

    normalised: bool
    sender_eps: float | None
    receiver_eps: float | None
    sender_input: Stacked  # the input Linear's sender columns (and its bias)
    receiver_input: Tensor | None  # its receiver columns (L, F_t, hidden); None: the fuser reads the sender alone
    trunk: StackedBlock
    projection_blocks: tuple[StackedBlock, ...]
    projection: Stacked  # views of ``projection_with_bias``
    projection_with_bias: Tensor  # (L, hidden + 1, out): the weight over its bias row, read by [p ; 1] (no bias pass)
    weight_block: StackedBlock
    weight_head: Stacked
    heads: int
    head_dim: int
    branches_up: Stacked | None = None  # the first projection block's and the weight block's up Linears side by side

    @classmethod
    def of(cls, streams: Sequence[nn.Module]) -> StackedStream:
        first = streams[0]
        sender_dim, normalised = first.sender_dim, first.sender_norm is not None
        inputs = [s.input for s in streams]
        receiver_norms = [s.receiver_norm for s in streams] if normalised else None
        receiver_input = None
        if first.input.in_features > sender_dim:  # the stream reads the receiver too
            receiver_input = _linear(inputs, receiver_norms, slice(sender_dim, None))[0]
        stream = cls(
            normalised,
            first.sender_norm.eps if normalised else None,
            first.receiver_norm.eps if normalised and first.receiver_norm is not None else None,
            _linear(inputs, [s.sender_norm for s in streams] if normalised else None, slice(0, sender_dim)),
            receiver_input,
            StackedBlock.of([s.trunk for s in streams]),
            tuple(StackedBlock.of(blocks) for blocks in zip(*(s.projection_blocks for s in streams))),
            *_with_bias(_linear([s.projection for s in streams])),
            StackedBlock.of([s.weight_block for s in streams]),
            _linear([s.weight_head for s in streams]),
            first.receiver_heads,
            first.receiver_head_dim,
        )
        if not stream.projection_blocks:
            return stream
        return replace(stream, branches_up=shared_up(stream.projection_blocks[0], stream.weight_block))

    def __call__(self, sender: Tensor | None, receiver: Tensor | None, scale: Tensor | None = None,
                 sender_part: Tensor | None = None) -> Tensor:
        """(L, B, H_s, N, D_s) [and (L, B, H_t, N, D_t)] -> weighted projections ``w * p`` (L, B, H_t, N, D_t);
        ``scale`` (L, B, N) multiplies each token's weight ``w``. ``sender_part``: the input Linear over the sender
        (:meth:`sender_product`, (L, M, hidden)) when made beforehand; ``sender`` is not read then."""
        layers, batch, _, length, _ = (sender if sender_part is None else receiver).shape
        h = self.sender_product(sender) if sender_part is None else sender_part  # (L, M, hidden)
        if self.receiver_input is not None:
            h = normalised_product(rows(receiver), self.receiver_eps, self.receiver_input, self.normalised, h)
        h = self.trunk(h)
        first_inner, weighted = self._branches(h)
        p = self._projection(h, first_inner).view(layers, batch, length, self.heads, self.head_dim)
        w = torch.sigmoid(linear(weighted, self.weight_head)).view(layers, batch, length, self.heads, 1)
        if scale is not None:
            w = w * scale[..., None, None]
        return p.mul_(w).transpose(2, 3)  # (L, B, H_t, N, D_t)

    def sender_product(self, sender: Tensor, weight: Stacked | None = None) -> Tensor:
        """(L, B, H_s, N, D_s) -> (L, B * N, hidden): the input Linear over the sender's half (with its bias);
        ``weight``: these layers' (weight, bias) when not :attr:`sender_input` (e.g. some of its layers)."""
        weight, bias = self.sender_input if weight is None else weight
        return normalised_product(rows(sender), self.sender_eps, weight, self.normalised, bias)

    def _branches(self, h: Tensor) -> tuple[Tensor | None, Tensor]:
        """The trunk's output ``h`` (L, M, hidden) into its two branches: the first projection block's GELU output
        (None without :attr:`branches_up`) and the weight block's output. With :attr:`branches_up` the two blocks'
        norm, up Linear and GELU run once, for both."""
        if self.branches_up is None:
            return None, self.weight_block(h)
        weight, bias = self.branches_up
        inner = F.gelu(normalised_product(h, self.weight_block.eps, weight, bias=bias))  # (L, M, both inner dims)
        split = self.projection_blocks[0].up[0].shape[-1]  # the first projection block's inner dim (each block has its own)
        return inner[..., :split], self.weight_block.finish(h, inner[..., split:])

    def _projection(self, h: Tensor, first_inner: Tensor | None = None) -> Tensor:
        """(L, M, hidden) -> (L, M, H_t * D_t): the projection blocks and the projection (``first_inner``: the first
        block's GELU output, made by :meth:`_branches`). Over many rows the last block writes ``p`` beside a ones
        column, read by the weight over its bias row: the bias costs no pass of its own."""
        blocks, ones = self.projection_blocks, None
        if h.shape[-2] > FEW_ROWS:
            ones = h.new_empty((*h.shape[:-1], h.shape[-1] + 1))  # [p ; 1]
            ones[..., -1] = 1
        for i, block in enumerate(blocks):
            out = ones[..., :-1] if ones is not None and i == len(blocks) - 1 else None
            h = block(h, out=out) if i or first_inner is None else block.finish(h, first_inner, out)
        if ones is None:
            return linear(h, self.projection)
        if not blocks:
            ones[..., :-1].copy_(h)
        return torch.bmm(ones, self.projection_with_bias)


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

    def select(self, indices: Sequence[int]) -> StackedLayers:
        """The stacks of ``indices`` (a subset of :attr:`indices`): views when they are consecutive here (a
        chunk of layers), copies otherwise."""
        indices = tuple(indices)
        if indices == self.indices:
            return self
        slots = [self.indices.index(i) for i in indices]
        if slots == list(range(slots[0], slots[0] + len(slots))):
            take = lambda t: t[slots[0] : slots[0] + len(slots)]  # noqa: E731
        else:
            index = torch.tensor(slots, device=self.value.weight_head[0].device)
            take = lambda t: t.index_select(0, index)  # noqa: E731
        return replace(_map_tensors(self, take), indices=indices)


def _map_tensors(stack, take):
    """``stack`` (a stacked dataclass, tuple or tensor) with ``take`` applied to every tensor in it."""
    if isinstance(stack, Tensor):
        return take(stack)
    if isinstance(stack, tuple):
        return tuple(_map_tensors(item, take) for item in stack)
    if is_dataclass(stack):
        return replace(stack, **{f.name: _map_tensors(getattr(stack, f.name), take) for f in fields(stack)})
    return stack


class InferenceStacks:
    """A fuser's stacked inference weights, made once and again only when a parameter moved or changed: every open
    layer (:class:`StackedLayers`) and, when asked, each open layer's K and V streams as one two-slot
    :class:`StackedStream` (the V stream alone without keys)."""

    def __init__(self) -> None:
        self.stack: StackedLayers | None = None
        self.streams: dict[int, StackedStream] = {}
        self.parameters: list[nn.Parameter] | None = None  # the module's, listed once (``forget`` lists them again)

    def forget(self) -> None:
        self.stack, self.streams, self.parameters = None, {}, None

    def of(self, module: nn.Module, layers: Sequence[nn.Module], opened: tuple[int, ...]) -> StackedLayers:
        """The stack of ``layers``' ``opened`` ones, made again when ``module``'s parameters moved or were updated."""
        if self.parameters is None:
            self.parameters = list(module.parameters())
        versions = tuple((p.data_ptr(), p._version) for p in self.parameters)
        if self.stack is None or self.stack.indices != opened or self.stack.versions != versions:
            self.stack, self.streams = StackedLayers.of(layers, opened, versions), {}
        return self.stack

    def layer_streams(self, layers: Sequence[nn.Module]) -> dict[int, StackedStream]:
        """Open layer -> its [K ;] V streams stacked (after :meth:`of`)."""
        if not self.streams and self.stack is not None:
            with torch.no_grad():
                self.streams = {i: StackedStream.of([s for s in (layers[i].key, layers[i].value) if s is not None])
                                for i in self.stack.indices}
        return self.streams
