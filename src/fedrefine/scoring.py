"""Scoring a multiple-choice question's options: next-token logits over the option letters, or each
option text's mean log-probability (cloze, lm-evaluation-harness style).

Both read the model's logits from the last prompt token on, so the same code scores a
participant alone and a fused receiver: only the ``forward`` that produces those logits differs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fedrefine.cache import positions_from_mask
from fedrefine.multiple_choice import AnswerStyle, EncodedQuestion, MultipleChoiceItem, encode_question
from fedrefine.padding import left_pad, right_pad
from fedrefine.participants import Participant

#: ``forward(response_ids, response_mask)`` -> logits (B, 1 + R, V) from the last prompt token on.
ContinuationForward = Callable[[Tensor, Tensor], Tensor]
#: Per question, how its options are named: first-token ids (letters) or full continuations (cloze).
OptionTokens = Sequence[Sequence[int]] | Sequence[Sequence[Sequence[int]]]


def option_logits(next_token_logits: Tensor, option_token_ids: Sequence[Sequence[int]]) -> Tensor:
    """(B, max options) logits of each row's option tokens from (B, V) next-token logits.

    Rows with fewer options (ragged batches) are padded with -inf, so argmax never picks a padding slot.
    """
    width = max(len(row) for row in option_token_ids)
    index = torch.zeros((len(option_token_ids), width), dtype=torch.long, device=next_token_logits.device)
    valid = torch.zeros_like(index, dtype=torch.bool)
    for i, row in enumerate(option_token_ids):
        index[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        valid[i, : len(row)] = True
    return next_token_logits.gather(1, index).masked_fill(~valid, float("-inf"))  # (B, width)


def continuation_scores(
    forward: ContinuationForward, continuations: Sequence[Sequence[Sequence[int]]], pad_id: int
) -> Tensor:
    """(B, max options) mean log-probability per token of each option's continuation (cloze scoring).

    ``forward(response_ids, response_mask)`` returns logits (B, 1 + R, V) from the last prompt
    token on, with the right-padded response teacher-forced. Missing options of ragged rows score -inf.
    """
    width = max(len(options) for options in continuations)
    scores = torch.full((len(continuations), width), float("-inf"))
    for k in range(width):
        rows = [options[k] if k < len(options) else options[0] for options in continuations]
        ids, mask = right_pad(rows, pad_id)  # (B, R) each
        logits = forward(ids, mask)  # (B, 1 + R, V)
        ids, mask = ids.to(logits.device), mask.to(logits.device)
        log_probs = logits[:, :-1].float().log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # (B, R)
        mean = (log_probs * mask).sum(1) / mask.sum(1)  # (B,)
        present = torch.tensor([k < len(options) for options in continuations], device=mean.device)
        scores[:, k] = torch.where(present, mean, float("-inf")).cpu()
    return scores


def score_options(
    next_token_logits: Callable[[], Tensor],
    forward: ContinuationForward,
    options: OptionTokens,
    style: AnswerStyle,
    pad_id: int,
) -> Tensor:
    """(B, max options) scores: option-letter logits (``letter``) or cloze log-probabilities (``text``).

    ``next_token_logits()`` gives (B, V) logits of the last prompt token; ``forward`` teacher-forces
    continuations (see :func:`continuation_scores`). Only the one the style needs is called.
    """
    if style == "letter":
        return option_logits(next_token_logits().float(), options)
    return continuation_scores(forward, options, pad_id)


@torch.no_grad()
def score_alone(participant: Participant, ids: Tensor, mask: Tensor, options: OptionTokens, style: AnswerStyle) -> Tensor:
    """(B, max options) scores of left-padded prompts ``ids``/``mask`` (B, N) by the participant alone."""
    model = participant.model

    def next_token_logits() -> Tensor:
        return model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits[:, -1]

    def forward(response_ids: Tensor, response_mask: Tensor) -> Tensor:
        full_mask = torch.cat((mask, response_mask.to(mask.device)), 1)  # (B, N + R)
        return model(
            input_ids=torch.cat((ids, response_ids.to(ids.device)), 1),
            attention_mask=full_mask,
            position_ids=positions_from_mask(full_mask),
            logits_to_keep=response_ids.shape[1] + 1,
        ).logits  # (B, 1 + R, V)

    return score_options(next_token_logits, forward, options, style, participant.tokenizer.pad_token_id)


def score_encoded(participant: Participant, encoded: Sequence[EncodedQuestion], style: AnswerStyle = "letter") -> Tensor:
    """(B, max options) scores of encoded questions by the participant alone, in one left-padded batch."""
    ids, mask = left_pad([e.chat.input_ids for e in encoded], participant.tokenizer.pad_token_id)
    options = [e.option_token_ids for e in encoded] if style == "letter" else [e.continuations for e in encoded]
    return score_alone(participant, ids.to(participant.device), mask.to(participant.device), options, style).cpu()


def predict_alone(
    participant: Participant, items: Sequence[MultipleChoiceItem], batch_size: int = 16, style: AnswerStyle = "letter"
) -> list[int]:
    """Predicted option index of each item by the participant alone (see :func:`score_encoded`)."""
    predictions: list[int] = []
    for start in range(0, len(items), batch_size):
        encoded = [encode_question(participant, item, style) for item in items[start : start + batch_size]]
        predictions.extend(score_encoded(participant, encoded, style).argmax(-1).tolist())
    return predictions
