"""The ``c2c_reference`` variant: the layer fuser that the C2C reference's ``C2CProjector`` computes.

Per receiver layer, separately for keys and values, over the caches as they are held (keys rotated)::

    h = FFN(W_in [s ; t] + b_in)                  raw concatenation, no input norm
    p = W_out FFN^(L-2)(h) + b_out                projected cache   (B, H_t, N, D_t)
    w = sigmoid(W_w FFN'(h) + b_w)                per-token, per-head weight (B, H_t, N, 1)
    delta = g * w * p                             g: this stream's own gate (keys and values apart)

FFN blocks are ``x + Dropout(W2 GELU(W1 RMSNorm(x)))`` with bias-free W1/W2 and eps 1e-6; FFN' (the weight
path) is ``hidden`` wide inside, the others ``hidden * ffn_multiplier``. Submodules carry the names of
:mod:`fedrefine.fuser.layers`' streams, so stacked inference (:mod:`fedrefine.fuser.stacked`) runs them too;
:data:`REFERENCE_NAMES` maps them to the reference's parameter names.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedrefine.fuser.config import FuserConfig
from fedrefine.fuser.layers import ConcreteGate, KeyFrame, KVPair, LayerFuser
from fedrefine.participants import ParticipantIdentity

#: RMSNorm epsilon of the reference's blocks.
REFERENCE_NORM_EPS = 1e-6


class ReferenceBlock(nn.Module):
    """Pre-norm residual MLP with bias-free linears: x + Dropout(W2 GELU(W1 RMSNorm(x)))."""

    def __init__(self, dim: int, inner_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=REFERENCE_NORM_EPS)
        self.up = nn.Linear(dim, inner_dim, bias=False)
        self.down = nn.Linear(inner_dim, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.dropout(self.down(nn.functional.gelu(self.up(self.norm(x)))))


class ReferenceStream(nn.Module):
    """One stream (K or V) of one layer as the reference computes it (see the module doc)."""

    sender_norm = None  # the reference reads the raw concatenation
    receiver_norm = None

    def __init__(self, sender_dim: int, receiver_heads: int, receiver_head_dim: int, config: FuserConfig) -> None:
        super().__init__()
        hidden, inner = config.hidden_size, max(1, round(config.hidden_size * config.ffn_multiplier))
        receiver_dim = receiver_heads * receiver_head_dim
        self.sender_dim, self.receiver_heads, self.receiver_head_dim = sender_dim, receiver_heads, receiver_head_dim
        self.input = nn.Linear(sender_dim + receiver_dim, hidden)
        self.trunk = ReferenceBlock(hidden, inner, config.dropout)
        self.projection_blocks = nn.Sequential(
            *(ReferenceBlock(hidden, inner, config.dropout) for _ in range(config.num_blocks - 2))
        )
        self.projection = nn.Linear(hidden, receiver_dim)
        self.weight_block = ReferenceBlock(hidden, hidden, config.dropout)
        self.weight_head = nn.Linear(hidden, receiver_heads)

    def forward(self, sender: Tensor, receiver: Tensor, scale: Tensor | None = None) -> Tensor:
        """Weighted projection ``w * p`` (B, H_t, N, D_t) from sender (B, H_s, N, D_s) and receiver states;
        ``scale`` (B, N) multiplies each token's weight ``w``."""
        batch, _, length, _ = sender.shape
        features = torch.cat((sender.transpose(1, 2).flatten(2), receiver.transpose(1, 2).flatten(2)), dim=-1)
        h = self.trunk(self.input(features))  # (B, N, hidden)
        p = self.projection(self.projection_blocks(h)).view(batch, length, self.receiver_heads, self.receiver_head_dim)
        w = torch.sigmoid(self.weight_head(self.weight_block(h))).unsqueeze(-1)  # (B, N, H_t, 1)
        if scale is not None:
            w = w * scale[:, :, None, None]
        return (w * p).transpose(1, 2)


class ReferenceLayerFuser(LayerFuser):
    """Residual deltas (dK, dV) for the receiver's rotated K/V, each stream behind its own gate."""

    key_frame: KeyFrame = "cache"

    def __init__(self, sender: ParticipantIdentity, receiver: ParticipantIdentity, config: FuserConfig) -> None:
        nn.Module.__init__(self)
        sender_dim = sender.num_kv_heads * sender.head_dim
        self.key = ReferenceStream(sender_dim, receiver.num_kv_heads, receiver.head_dim, config)
        self.value = ReferenceStream(sender_dim, receiver.num_kv_heads, receiver.head_dim, config)
        self.key_gate = ConcreteGate(config.gate_init, config.gate_noise)
        self.value_gate = ConcreteGate(config.gate_init, config.gate_noise)

    def gate_logit(self) -> Tensor:
        """The layer fuses when either stream's gate is open."""
        return torch.maximum(self.key_gate.logit, self.value_gate.logit)

    def stream_gates(self) -> Tensor:
        return torch.stack([self.key_gate.logit, self.value_gate.logit]).gt(0).to(self.key_gate.logit.dtype)

    def forward(self, sender: KVPair, receiver: KVPair, temperature: Tensor, scale: Tensor | None = None) -> KVPair:
        keys, values = self.key(sender[0], receiver[0], scale), self.value(sender[1], receiver[1], scale)
        shape = (*keys.shape[:3], 1)  # the reference draws its noise per (sample, head, token)
        return self.key_gate(temperature, shape) * keys, self.value_gate(temperature, shape) * values


def _block_names(ours: str, theirs: str) -> dict[str, str]:
    return {f"{ours}.norm.weight": f"{theirs}.norm.weight", f"{ours}.up.weight": f"{theirs}.w1.weight",
            f"{ours}.down.weight": f"{theirs}.w2.weight"}


def reference_names(num_blocks: int) -> dict[str, str]:
    """Each parameter of a :class:`ReferenceLayerFuser` -> its name in the reference's projector state dict."""
    names = {"key_gate.logit": "key_gate_logit", "value_gate.logit": "value_gate_logit"}
    for ours, theirs in (("key", "key"), ("value", "value")):
        names |= {f"{ours}.input.weight": f"{theirs}_in.weight", f"{ours}.input.bias": f"{theirs}_in.bias"}
        names |= _block_names(f"{ours}.trunk", f"{theirs}_mlp1.blocks.0")
        for i in range(num_blocks - 2):
            names |= _block_names(f"{ours}.projection_blocks.{i}", f"{theirs}_proj_mlp2.blocks.{i}")
        names |= {f"{ours}.projection.weight": f"{theirs}_proj_out.weight", f"{ours}.projection.bias": f"{theirs}_proj_out.bias"}
        names |= _block_names(f"{ours}.weight_block", f"{theirs}_scalar_mlp2.blocks.0")
        names |= {f"{ours}.weight_head.weight": f"{theirs}_scalar_head.weight",
                  f"{ours}.weight_head.bias": f"{theirs}_scalar_head.bias"}
    return names
