"""Rotary position embedding (RoPE): the one place keys leave and re-enter a model's position frame.

Fusers work in a position-free space: a sender's keys are un-rotated with the *sender's* RoPE
(its own base and scaling) and whatever a fuser writes is rotated with the *receiver's*, so
models with different rotary bases are fused without mixing their angles.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def rotary_cos_sin(rotary_embedding: nn.Module, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin of a model's own rotary embedding at ``position_ids`` (B, N), shaped (B, 1, N, head_dim)."""
    probe = torch.zeros((), dtype=dtype, device=position_ids.device)
    cos, sin = rotary_embedding(probe, position_ids)  # (B, N, D) each
    return cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads: (B, 1, N, D)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, N, D) states by the given angles (HF's half-split RoPE convention):
    ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = [-x2 ; x1]``. Without autograd each half is
    written in place into the output (no rotated copy, no concatenation)."""
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]  # (..., D/2) each
    if torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad):  # training
        return torch.addcmul(x * cos, torch.cat((-second, first), dim=-1), sin)
    out = _output_like(x, cos)
    out_first, out_second = out[..., :half], out[..., half:]
    torch.mul(first, cos[..., :half], out=out_first).addcmul_(second, sin[..., :half], value=-1)
    torch.mul(second, cos[..., half:], out=out_second).addcmul_(first, sin[..., half:])
    return out


def _output_like(x: Tensor, cos: Tensor) -> Tensor:
    """An empty rotation output: ``x``'s memory layout when the angles only broadcast into it (a stack of keys held
    heads-last, as the fusers' rows read them, stays so: no layout copy, and every pass runs in memory order)."""
    shape, dtype = torch.broadcast_shapes(x.shape, cos.shape), torch.promote_types(x.dtype, cos.dtype)
    if shape == x.shape:
        return torch.empty_like(x, dtype=dtype)  # strides of x when it is dense
    return torch.empty(shape, dtype=dtype, device=x.device)


def add_rotary(target: Tensor, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``target + apply_rotary(x, cos, sin)`` in ``target``'s dtype. Without autograd, and when ``target`` holds the
    rotation's dtype, it is written into ``target`` half by half (four in-place multiply-adds: no rotated copy)."""
    if (torch.is_grad_enabled() and (target.requires_grad or x.requires_grad)) or target.dtype != torch.promote_types(x.dtype, cos.dtype):
        rotated = apply_rotary(x, cos, sin).to(target.dtype)
        return target + rotated if torch.is_grad_enabled() and (target.requires_grad or x.requires_grad) else target.add_(rotated)
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    target[..., :half].addcmul_(first, cos[..., :half]).addcmul_(second, sin[..., :half], value=-1)
    target[..., half:].addcmul_(second, cos[..., half:]).addcmul_(first, sin[..., half:])
    return target


def rotation_matrix(cos: Tensor, sin: Tensor) -> Tensor:
    """(..., 1, D) angles of one position -> (..., D, D) ``A`` with ``x @ A == apply_rotary(x, cos, sin)`` for rows
    ``x`` (..., D): ``cos`` on the diagonal, ``-sin`` / ``+sin`` where :func:`apply_rotary`'s halves meet."""
    half = cos.shape[-1] // 2
    cos, sin = cos[..., 0, :], sin[..., 0, :]  # (..., D)
    matrix = torch.diag_embed(cos)
    index = torch.arange(half, device=cos.device)
    matrix[..., index + half, index] = -sin[..., :half]  # out_j = x_j cos_j - x_(j+half) sin_j  (j < half)
    matrix[..., index, index + half] = sin[..., half:]  # out_(j+half) = x_(j+half) cos + x_j sin
    return matrix


def inverse_angles(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """The cos and sin that :func:`apply_rotary` undoes the rotation by ``cos``, ``sin`` with: the negative
    angles, divided by ``cos^2 + sin^2`` (which undoes any attention scaling folded into them)."""
    scale = cos * cos + sin * sin
    return cos / scale, -sin / scale


def remove_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Inverse of :func:`apply_rotary`: rotate by the negative angles (and undo any attention scaling)."""
    return apply_rotary(x, *inverse_angles(cos, sin))


class RotaryFrame:
    """One model's rotary angles at a batch of positions (B, N); rotates and un-rotates keys there in fp32.

    Args:
        rotary_embedding: the model's own rotary embedding module (``Participant.rotary_embedding``).
        positions: position ids (B, N) of the keys that will be rotated or un-rotated.
    """

    def __init__(self, rotary_embedding: nn.Module, positions: Tensor) -> None:
        self.cos, self.sin = rotary_cos_sin(rotary_embedding, positions, torch.float32)  # (B, 1, N, D) each
        self._inverse: tuple[Tensor, Tensor] | None = None

    def unrotate(self, keys: Tensor) -> Tensor:
        """Position-free fp32 keys (..., B, H, N, D) from keys rotated at this frame's positions (any leading
        axes, e.g. a stack of layers, share the angles)."""
        if self._inverse is None:  # computed once per frame
            self._inverse = inverse_angles(self.cos, self.sin)
        return apply_rotary(keys, *self._inverse)

    def rotate(self, keys: Tensor) -> Tensor:
        """fp32 keys (..., B, H, N, D) rotated to this frame's positions."""
        return apply_rotary(keys, self.cos, self.sin)

    def matrices(self) -> tuple[Tensor, Tensor]:
        """The rotation and its inverse at each sample's one position (a frame of (B, 1) positions) as matrices
        (B, 1, D, D): ``x @ rotation`` is :meth:`rotate` of rows ``x`` (B, H, 1, D), one product instead of four
        half-width passes (what a single fused token is rotated with, once per layer)."""
        if self.cos.shape[-2] != 1:
            raise ValueError(f"Rotation matrices are for one position per sample; this frame holds {self.cos.shape[-2]}.")
        if self._inverse is None:
            self._inverse = inverse_angles(self.cos, self.sin)
        return rotation_matrix(self.cos, self.sin), rotation_matrix(*self._inverse)

    def add_rotated(self, target: Tensor, keys: Tensor) -> Tensor:
        """``target + rotate(keys)`` (see :func:`add_rotary`: in place without autograd)."""
        return add_rotary(target, keys, self.cos, self.sin)
