"""The blocks of a fuser: per receiver layer, a K and a V stream (trunk, projection and weight heads) and a gate.

Per receiver layer, separately for keys and values (shapes (B, H, N, D))::

    h = FFN(W_in [s ; t] + b_in)                  trunk over sender s and receiver t
    p = W_out FFN^(L-2)(h) + b_out                projected cache   (B, H_t, N, D_t)
    w = sigmoid(W_w FFN(h) + b_w)                 per-token, per-head weight (B, H_t, N, 1)
    delta = g * w * p                             g: the layer's binary-concrete gate

Residual mode returns the deltas; concat mode reads the sender alone and returns new cache entries. With
``reads_kv_together`` both streams read ``s = [K_s ; V_s]`` (each head's key and value side by side).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from fedrefine.fuser.config import FuserConfig, GateNoise
from fedrefine.kv.cache import LayerKV
from fedrefine.participants import ParticipantIdentity

#: One layer's (K, V) where the keys may be absent (values-only fusion).
KVPair = tuple[Tensor | None, Tensor]
#: The frame of the keys a layer fuser reads and writes: ``position_free`` (rotary embedding removed; the caller
#: un-rotates and re-rotates) or ``cache`` (rotated, as the cache holds them: the C2C reference's frame).
KeyFrame = Literal["position_free", "cache"]


def stream_inputs(keys: Tensor | None, values: Tensor, together: bool) -> KVPair:
    """What the K and the V stream read of the sender's keys and values (..., D_s): each its own, or (``together``)
    both the two side by side (..., 2 D_s)."""
    if not together:
        return keys, values
    both = torch.cat((keys, values), dim=-1)
    return both, both


class FeedForwardBlock(nn.Module):
    """Pre-norm residual MLP: x + Dropout(W2 GELU(W1 RMSNorm(x)))."""

    def __init__(self, dim: int, inner_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(dim)
        self.up = nn.Linear(dim, inner_dim)
        self.down = nn.Linear(inner_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.dropout(self.down(nn.functional.gelu(self.up(self.norm(x)))))


class StreamFuser(nn.Module):
    """One stream (K or V) of one layer: trunk, projection head and per-head weight head."""

    def __init__(self, sender_dim: int, receiver_heads: int, receiver_head_dim: int, config: FuserConfig) -> None:
        super().__init__()
        hidden, inner = config.hidden_size, max(1, round(config.hidden_size * config.ffn_multiplier))
        receiver_dim = receiver_heads * receiver_head_dim
        reads_receiver = config.mode == "residual" and config.reads_receiver
        self.receiver_heads, self.receiver_head_dim = receiver_heads, receiver_head_dim
        self.sender_norm = nn.RMSNorm(sender_dim)
        self.receiver_norm = nn.RMSNorm(receiver_dim) if reads_receiver else None
        self.sender_dim = sender_dim
        self.input = nn.Linear(sender_dim + (receiver_dim if reads_receiver else 0), hidden)
        self.trunk = FeedForwardBlock(hidden, inner, config.dropout)
        self.projection_blocks = nn.Sequential(
            *(FeedForwardBlock(hidden, inner, config.dropout) for _ in range(config.num_blocks - 2))
        )
        self.projection = nn.Linear(hidden, receiver_dim)
        self.weight_block = FeedForwardBlock(hidden, inner, config.dropout)
        self.weight_head = nn.Linear(hidden, receiver_heads)
        # Start as the identity map on the receiver's cache: nothing is added until trained.
        nn.init.zeros_(self.projection.weight)
        nn.init.zeros_(self.projection.bias)

    def forward(self, sender: Tensor, receiver: Tensor | None = None, scale: Tensor | None = None) -> Tensor:
        """Weighted projection ``w * p`` (B, H_t, N, D_t) from sender (B, H_s, N, D_s) [and receiver] states;
        ``scale`` (B, N) multiplies each token's weight ``w`` (e.g. 0 where a token is not aligned)."""
        batch, _, length, _ = sender.shape
        features = self.sender_norm(sender.transpose(1, 2).flatten(2))
        if self.receiver_norm is not None:  # residual mode reading the receiver's states
            if receiver is None:
                raise ValueError("A residual fuser needs the receiver's states at the same positions.")
            features = torch.cat((features, self.receiver_norm(receiver.transpose(1, 2).flatten(2))), dim=-1)
        h = self.trunk(self.input(features))
        p = self.projection(self.projection_blocks(h)).view(batch, length, self.receiver_heads, self.receiver_head_dim)
        w = torch.sigmoid(self.weight_head(self.weight_block(h))).unsqueeze(-1)  # (B, N, H_t, 1)
        if scale is not None:
            w = w * scale[:, :, None, None]
        return (w * p).transpose(1, 2)


class ConcreteGate(nn.Module):
    """Per-layer gate: binary-concrete sample in training (logistic noise, or the C2C reference's Gumbel draw),
    ``logit > 0`` in eval."""

    def __init__(self, init: float, noise: GateNoise = "logistic") -> None:
        super().__init__()
        self.logit = nn.Parameter(torch.tensor(float(init)))
        self.noise = noise

    def forward(self, temperature: Tensor, shape: tuple[int, ...] = ()) -> Tensor:
        """The gate (eval: a 0-d hard gate); in training a sample of ``shape`` (one per element it multiplies)."""
        if not self.training:
            return (self.logit > 0).to(self.logit.dtype)
        if self.noise == "gumbel":  # the reference's draw: P(open) = 1 - exp(-exp(logit)), 0.63 at logit 0
            u = torch.rand(shape, device=self.logit.device, dtype=self.logit.dtype)
            noise = -torch.log(-torch.log(u + 1e-20) + 1e-20)
        else:
            u = torch.rand(shape, device=self.logit.device).clamp(1e-6, 1 - 1e-6)
            noise = torch.log(u) - torch.log1p(-u)  # logistic, so P(open) = sigmoid(logit)
        return torch.sigmoid((self.logit + noise) / temperature)


class LayerFuser(nn.Module):
    """Fuser for one receiver layer: K and V streams plus the layer's gate (see the two modes below)."""

    key_frame: KeyFrame = "position_free"

    def __init__(self, sender: ParticipantIdentity, receiver: ParticipantIdentity, config: FuserConfig) -> None:
        super().__init__()
        self.reads_kv_together = config.reads_kv_together  # each stream reads the sender's [K ; V]
        sender_dim = sender.num_kv_heads * sender.head_dim * (2 if self.reads_kv_together else 1)
        fuse_keys = config.fuse_keys or config.mode == "concat"  # concat entries need keys of their own
        self.key = StreamFuser(sender_dim, receiver.num_kv_heads, receiver.head_dim, config) if fuse_keys else None
        self.value = StreamFuser(sender_dim, receiver.num_kv_heads, receiver.head_dim, config)
        self.gate = ConcreteGate(config.gate_init, config.gate_noise)

    def gate_logit(self) -> Tensor:
        """The logit that opens this layer (0-d; the layer fuses in eval when it is > 0)."""
        return self.gate.logit

    def stream_gates(self) -> Tensor | None:
        """(2,) the eval gates of the K and V streams when they can differ from the layer's (None: they cannot)."""
        return None


class ResidualLayerFuser(LayerFuser):
    """Residual mode: gated deltas (dK, dV) for the receiver's (unrotated) K/V at the same positions;
    dK is None when the fuser fuses values only (``fuse_keys: false``)."""

    def forward(self, sender: KVPair, receiver: KVPair, temperature: Tensor, scale: Tensor | None = None) -> KVPair:
        g = self.gate(temperature)
        sender = stream_inputs(*sender, self.reads_kv_together)  # (B, H_s, N, D_s or 2 D_s) each
        delta_values = g * self.value(sender[1], receiver[1], scale)  # (B, H_t, N, D_t)
        if self.key is None:
            return None, delta_values
        return g * self.key(sender[0], receiver[0], scale), delta_values


class ConcatLayerFuser(LayerFuser):
    """Concat mode: new (K, V) cache entries from the sender's states alone; the gate scales the values."""

    def forward(self, sender: KVPair, receiver: None, temperature: Tensor, scale: None = None) -> LayerKV:
        g = self.gate(temperature)
        return self.key(sender[0]), g * self.value(sender[1])  # (B, H_t, N_s, D_t) each


LAYER_FUSERS: dict[str, type[LayerFuser]] = {"residual": ResidualLayerFuser, "concat": ConcatLayerFuser}
