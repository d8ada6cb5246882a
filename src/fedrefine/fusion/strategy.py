"""What every fusion strategy shares: its inputs, what it hands the receiver, and the unfused prefill.

A strategy (:mod:`~fedrefine.fusion.residual` or :mod:`~fedrefine.fusion.concat`) is chosen once
per receiver from its fusers' mode; the receiver then only runs its model over the
:class:`ReceiverContext` the strategy prepares.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import Cache

from fedrefine.fuser import Fuser
from fedrefine.fusion.batch import SenderBatch
from fedrefine.fusion.sender_kv import SenderKV
from fedrefine.kv.cache import positions_from_mask, returned_cache
from fedrefine.participants import Participant
from fedrefine.participants.align import AlignedMessages


@dataclass(frozen=True)
class FusionInput:
    """One sender's part in a fusion: its K/V, its fuser, where receiver tokens read it, and its weight.

    ``alignment`` (B, N_t): sender column per receiver column, -1 where unaligned (residual only).
    ``weight`` (B, L_t): the gating network's share of this sender per receiver layer (None: 1).
    """

    kv: SenderKV
    fuser: Fuser
    alignment: Tensor | None = None
    weight: Tensor | None = None


@dataclass(frozen=True)
class ReceiverContext:
    """What the receiver runs the rest of its tokens over.

    ``cache`` holds either the first ``consumed`` prompt tokens (residual: fused in place) or
    ``prefix_mask.shape[1]`` entries placed ahead of the prompt (concat), with ``prefix_mask`` (B, P).
    """

    cache: Cache
    prefix_mask: Tensor | None
    consumed: int

    @property
    def prefix_length(self) -> int:
        return 0 if self.prefix_mask is None else self.prefix_mask.shape[1]

    def cached_mask(self, attention_mask: Tensor) -> Tensor:
        """(B, P + consumed) the mask over what the cache holds, from the prompt's ``attention_mask`` (B, N): the
        entries placed ahead of the prompt, then the prompt tokens already consumed."""
        consumed = attention_mask[:, : self.consumed]
        return consumed if self.prefix_mask is None else torch.cat((self.prefix_mask, consumed), dim=1)


def prefill_all_but_last(
    receiver: Participant, input_ids: Tensor, attention_mask: Tensor, cut: int | None = None
) -> ReceiverContext:
    """The receiver's own cache over its prompt (B, N) but the last token, which it then runs itself (``cut``:
    over the first ``cut`` columns only, the rest run over the fused cache)."""
    cut = input_ids.shape[1] - 1 if cut is None else cut
    mask = attention_mask[:, :cut]  # (B, cut)
    with torch.no_grad():
        output = receiver.model(
            input_ids=input_ids[:, :cut], attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=True,
            logits_to_keep=1,  # the cache is what is kept; the last prompt token's logits come after fusion
        )
    return ReceiverContext(returned_cache(output), None, cut)


class FusionStrategy(ABC):
    """How sender K/V enter a receiver: prepares the receiver's context from the senders' inputs."""

    #: ``residual`` or ``concat`` (the fusers' mode).
    mode: str
    #: Whether sender tokens must be aligned to the receiver's (same text read by both).
    aligns: bool
    #: Which messages' tokens are aligned (``last``: only the last, the answer prefix every participant reads).
    aligned_messages: AlignedMessages = "all"

    def sent_positions(self, batch: SenderBatch) -> Tensor | None:
        """(B, N_s) the sender positions its fuser reads, hence transmitted; None: every real position."""
        return None

    @abstractmethod
    def prepare(
        self,
        receiver: Participant,
        input_ids: Tensor,
        attention_mask: Tensor,
        inputs: Sequence[FusionInput],
        own: ReceiverContext | None = None,
        whole_prompt: bool = False,
    ) -> ReceiverContext:
        """The receiver's context for its prompt ``input_ids``/``attention_mask`` (B, N), fused with ``inputs``.

        ``own``: the receiver's :func:`prefill_all_but_last` of that prompt when it already ran (e.g. while
        remote senders worked); strategies that start from it use it instead of running it again.
        ``whole_prompt``: the caller reads the whole prompt next in one forward (a prompt read, not a training
        step); a strategy that can fuse as the prompt is read may leave every prompt token to it."""
