"""Examples and padded batches for one receiver and any number of senders.

Prompts are left-padded (so every prompt ends at the same column), responses right-padded.
Alignment indices (residual fusion) point into each sender's padded sequence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedrefine.participants.padding import left_pad, right_pad


@dataclass
class SenderExample:
    """One sender's token ids for a prompt and, for residual fusion, the receiver->sender alignment."""

    input_ids: list[int]
    alignment: list[int] | None = None


@dataclass
class FusionExample:
    """A prompt encoded for the receiver and each sender, with an optional response to supervise."""

    receiver_ids: list[int]
    senders: dict[str, SenderExample]
    response_ids: list[int] | None = None


@dataclass
class SenderBatch:
    """One sender's padded prompts and, for residual fusion, where each receiver token reads from."""

    input_ids: Tensor  # (B, N_s)
    attention_mask: Tensor  # (B, N_s)
    alignment: Tensor | None = None  # (B, N_t): sender column per receiver column, -1 where unaligned

    def to(self, device: torch.device | str) -> SenderBatch:
        alignment = None if self.alignment is None else self.alignment.to(device)
        return SenderBatch(self.input_ids.to(device), self.attention_mask.to(device), alignment)

    def select(self, rows: Tensor) -> SenderBatch:
        alignment = None if self.alignment is None else self.alignment[rows]
        return SenderBatch(self.input_ids[rows], self.attention_mask[rows], alignment)


@dataclass
class FusionBatch:
    """Padded tensors for a batch of :class:`FusionExample`."""

    receiver_input_ids: Tensor  # (B, N_t), left-padded
    receiver_attention_mask: Tensor  # (B, N_t)
    senders: dict[str, SenderBatch] = field(default_factory=dict)
    response_ids: Tensor | None = None  # (B, R), right-padded
    response_mask: Tensor | None = None  # (B, R)

    def __len__(self) -> int:
        return self.receiver_input_ids.shape[0]

    def to(self, device: torch.device | str) -> FusionBatch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return FusionBatch(
            self.receiver_input_ids.to(device),
            self.receiver_attention_mask.to(device),
            {name: batch.to(device) for name, batch in self.senders.items()},
            move(self.response_ids),
            move(self.response_mask),
        )

    def select(self, rows: Sequence[int]) -> FusionBatch:
        """The sub-batch of the given rows (padding is kept, which is harmless)."""
        index = torch.tensor(list(rows), device=self.receiver_input_ids.device)
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return FusionBatch(
            self.receiver_input_ids[index],
            self.receiver_attention_mask[index],
            {name: batch.select(index) for name, batch in self.senders.items()},
            pick(self.response_ids),
            pick(self.response_mask),
        )


def _pad_alignments(examples: Sequence[FusionExample], name: str, receiver_width: int, sender_width: int) -> Tensor:
    alignment = torch.full((len(examples), receiver_width), -1, dtype=torch.long)  # (B, N_t)
    for i, example in enumerate(examples):
        sender = example.senders[name]
        row = torch.tensor(sender.alignment, dtype=torch.long)
        row = torch.where(row >= 0, row + sender_width - len(sender.input_ids), row)  # shift by the left padding
        alignment[i, receiver_width - len(example.receiver_ids) :] = row
    return alignment


def collate_examples(
    examples: Sequence[FusionExample], receiver_pad_id: int, sender_pad_ids: Mapping[str, int]
) -> FusionBatch:
    """Pad examples into a :class:`FusionBatch`; every example must carry the same senders."""
    if not examples:
        raise ValueError("Cannot collate an empty batch.")
    names = list(examples[0].senders)
    if any(list(e.senders) != names for e in examples):
        raise ValueError("Every example of a batch must be encoded for the same senders.")
    receiver_ids, receiver_mask = left_pad([e.receiver_ids for e in examples], receiver_pad_id)
    batch = FusionBatch(receiver_ids, receiver_mask)
    for name in names:
        ids, mask = left_pad([e.senders[name].input_ids for e in examples], sender_pad_ids[name])
        has_alignment = [e.senders[name].alignment is not None for e in examples]
        if any(has_alignment) and not all(has_alignment):
            raise ValueError(f"Sender {name}: either every example has an alignment or none has.")
        alignment = _pad_alignments(examples, name, receiver_ids.shape[1], ids.shape[1]) if all(has_alignment) else None
        batch.senders[name] = SenderBatch(ids, mask, alignment)
    responses = [e.response_ids for e in examples]
    if any(r is not None for r in responses):
        if any(r is None for r in responses):
            raise ValueError("Either every example of a batch has a response or none has.")
        batch.response_ids, batch.response_mask = right_pad(responses, receiver_pad_id)
    return batch
