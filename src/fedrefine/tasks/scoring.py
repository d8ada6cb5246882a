"""Scoring a multiple-choice question's options: next-token logits over the option letters, or each
option text's log-likelihood (cloze, lm-evaluation-harness style).

Both read the model's logits from the last prompt token on, so the same code scores a
participant alone and a fused receiver: only the ``forward`` that produces those logits differs.
Cloze scoring computes each option's summed log-probability and its lengths once
(:class:`OptionScores`); every :data:`Normalization` is derived from those.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fedrefine.kv.cache import positions_from_mask
from fedrefine.participants import Participant
from fedrefine.participants.padding import left_pad, right_pad
from fedrefine.tasks.multiple_choice import (
    AnswerStyle,
    ClozeOptions,
    EncodedQuestion,
    MultipleChoiceItem,
    PromptStyle,
    encode_question,
)

#: ``forward(response_ids, response_mask)`` -> logits (B, 1 + R, V) from the last prompt token on.
ContinuationForward = Callable[[Tensor, Tensor], Tensor]
#: Per question, how its options are named: first-token ids (letters) or cloze continuations.
OptionTokens = Sequence[Sequence[int]] | Sequence[ClozeOptions]
#: How a cloze option's summed log-probability is normalised before the argmax: ``sum`` (none;
#: lm-eval's ``acc``), ``chars`` (per character of the option text; lm-eval's ``acc_norm``) or
#: ``token_mean`` (per continuation token).
Normalization = Literal["sum", "chars", "token_mean"]
NORMALIZATIONS: tuple[str, ...] = ("sum", "chars", "token_mean")


def check_normalization(normalization: str) -> None:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"Unknown cloze normalization {normalization!r}; choose one of {list(NORMALIZATIONS)}.")


@dataclass(frozen=True)
class OptionScores:
    """Every row's option scores, computed once.

    Letters: ``total`` holds the option letters' logits and normalisation does not apply. Cloze:
    ``total`` holds each option's summed log-probability, ``tokens`` its continuation's token count
    and ``chars`` its text's character count; :meth:`normalized` derives each normalisation. Missing
    options of ragged rows have ``total`` -inf (and lengths 1), so an argmax never picks them.
    """

    total: Tensor  # (B, K)
    tokens: Tensor | None = None  # (B, K) cloze only
    chars: Tensor | None = None  # (B, K) cloze only

    @property
    def cloze(self) -> bool:
        return self.tokens is not None

    def normalized(self, normalization: Normalization = "sum") -> Tensor:
        """(B, K) scores under ``normalization`` (cloze); the letter logits unchanged (letters)."""
        check_normalization(normalization)
        if not self.cloze or normalization == "sum":
            return self.total
        return self.total / (self.chars if normalization == "chars" else self.tokens)  # (B, K)

    def predictions(self, normalization: Normalization = "sum") -> Tensor:
        """(B,) index of each row's best option under ``normalization``."""
        return self.normalized(normalization).argmax(-1)

    def cpu(self) -> OptionScores:
        return OptionScores(*(None if t is None else t.cpu() for t in (self.total, self.tokens, self.chars)))


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


def continuation_scores(forward: ContinuationForward, options: Sequence[ClozeOptions], pad_id: int) -> OptionScores:
    """Each option's summed continuation log-probability, token count and character count (cloze scoring).

    ``forward(response_ids, response_mask)`` returns logits (B, 1 + R, V) from the last prompt
    token on, with the right-padded response teacher-forced; it runs once per option slot.
    """
    width = max(len(o.continuations) for o in options)
    total = torch.full((len(options), width), float("-inf"))  # (B, K)
    tokens, chars = torch.ones_like(total), torch.ones_like(total)  # (B, K) each
    for i, o in enumerate(options):
        tokens[i, : len(o.continuations)] = torch.tensor([len(c) for c in o.continuations], dtype=total.dtype)
        chars[i, : len(o.chars)] = torch.tensor(o.chars, dtype=total.dtype)
    for k in range(width):
        rows = [o.continuations[k] if k < len(o.continuations) else o.continuations[0] for o in options]
        ids, mask = right_pad(rows, pad_id)  # (B, R) each
        logits = forward(ids, mask)  # (B, 1 + R, V)
        ids, mask = ids.to(logits.device), mask.to(logits.device)
        log_probs = logits[:, :-1].float().log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # (B, R)
        summed = (log_probs * mask).sum(1)  # (B,)
        present = torch.tensor([k < len(o.continuations) for o in options], device=summed.device)  # (B,)
        total[:, k] = torch.where(present, summed, float("-inf")).cpu()
    return OptionScores(total, tokens, chars)


def score_options(
    next_token_logits: Callable[[], Tensor],
    forward: ContinuationForward,
    options: OptionTokens,
    style: AnswerStyle,
    pad_id: int,
) -> OptionScores:
    """Option-letter logits (``letter``) or cloze log-likelihoods (``text``), (B, max options).

    ``next_token_logits()`` gives (B, V) logits of the last prompt token; ``forward`` teacher-forces
    continuations (see :func:`continuation_scores`). Only the one the style needs is called.
    """
    if style == "letter":
        return OptionScores(option_logits(next_token_logits().float(), options))
    return continuation_scores(forward, options, pad_id)


@torch.no_grad()
def score_alone(
    participant: Participant, ids: Tensor, mask: Tensor, options: OptionTokens, style: AnswerStyle
) -> OptionScores:
    """Option scores of left-padded prompts ``ids``/``mask`` (B, N) by the participant alone."""
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


def score_encoded(participant: Participant, encoded: Sequence[EncodedQuestion], style: AnswerStyle = "letter") -> OptionScores:
    """Option scores of encoded questions by the participant alone, in one left-padded batch (on the CPU)."""
    ids, mask = left_pad([e.chat.input_ids for e in encoded], participant.tokenizer.pad_token_id)
    options = [e.option_token_ids for e in encoded] if style == "letter" else [e.cloze for e in encoded]
    return score_alone(participant, ids.to(participant.device), mask.to(participant.device), options, style).cpu()


def predict_alone(
    participant: Participant,
    items: Sequence[MultipleChoiceItem],
    batch_size: int = 16,
    style: AnswerStyle = "letter",
    normalization: Normalization = "token_mean",
    prompt_style: PromptStyle = "chat",
) -> list[int]:
    """Predicted option index of each item by the participant alone (see :func:`score_encoded`);
    ``normalization`` applies to cloze scores."""
    predictions: list[int] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        encoded = [encode_question(participant, item, style, prompt_style=prompt_style) for item in chunk]
        predictions.extend(score_encoded(participant, encoded, style).predictions(normalization).tolist())
    return predictions
