"""Scoring a multiple-choice question's options: next-token logits over the option letters, or each
option text's log-likelihood (cloze, lm-evaluation-harness style).

Both read one :class:`~fedrefine.kv.prompt.PromptState`: the model's state after reading the prompt
once, whatever read it (a participant alone, a fused receiver). Letters are scored from its last
logits; cloze continuations of every option run in one forward over copies of its cache. Cloze
scoring computes each option's summed log-probability and its lengths once (:class:`OptionScores`);
every :data:`Normalization` is derived from those.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from fedrefine.kv.prompt import PromptState, continuation_logits, read_prompt
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


def continuation_scores(model: nn.Module, state: PromptState, options: Sequence[ClozeOptions], pad_id: int) -> OptionScores:
    """Each option's summed continuation log-probability, token count and character count (cloze scoring).

    Every option of every row is scored over the one ``state`` its row's prompt was read into: its first token
    from the state's last logits, the rest from one forward of every continuation longer than one token over
    copies of its prompt's cache row (the last token of a continuation is never read). Rows with fewer options
    than the widest report -inf there.
    """
    width = max(len(o.continuations) for o in options)
    total = torch.full((len(options), width), float("-inf"), dtype=torch.float32)  # (B, K), fp32 in every precision
    tokens, chars = torch.ones_like(total), torch.ones_like(total)  # (B, K) each
    for i, o in enumerate(options):
        tokens[i, : len(o.continuations)] = torch.tensor([len(c) for c in o.continuations], dtype=total.dtype)
        chars[i, : len(o.chars)] = torch.tensor(o.chars, dtype=total.dtype)
    first = state.last_logits.float().log_softmax(-1)  # (B, V): predicts each continuation's first token
    scored = [(i, k, c) for i, o in enumerate(options) for k, c in enumerate(o.continuations)]
    for group in ([s for s in scored if len(s[2]) == 1], [s for s in scored if len(s[2]) > 1]):  # only these run a forward
        if group:
            rows, slots = torch.tensor([i for i, _, _ in group]), torch.tensor([k for _, k, _ in group])
            total[rows, slots] = _summed_log_probs(model, state, first, rows, [c for _, _, c in group], pad_id)
    return OptionScores(total, tokens, chars)


def _summed_log_probs(
    model: nn.Module, state: PromptState, first: Tensor, prompts: Tensor, continuations: Sequence[Sequence[int]], pad_id: int
) -> Tensor:
    """(C,) each continuation's summed log-probability after its prompt ``prompts[c]`` (see :func:`token_log_probs`)."""
    log_probs, _, mask = token_log_probs(model, state, first, prompts, continuations, pad_id)
    return (log_probs * mask).sum(1).cpu()


def token_log_probs(
    model: nn.Module, state: PromptState, first: Tensor, prompts: Tensor, continuations: Sequence[Sequence[int]], pad_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Each continuation token's log-probability after its prompt ``prompts[c]``, whether it was the greedy choice
    there, and the mask of real tokens, each (C, R): the first token from the prompts' next-token log-probabilities
    ``first`` (B, V), later tokens (when any continuation has them) from one forward over copies of the prompts'
    cache rows."""
    ids, mask = (t.to(first.device) for t in right_pad(continuations, pad_id))  # (C, R) each
    prompts = prompts.to(first.device)
    first_rows = first.index_select(0, prompts)  # (C, V)
    log_probs = first_rows.gather(1, ids[:, :1])  # (C, 1)
    greedy = first_rows.argmax(-1, keepdim=True) == ids[:, :1]  # (C, 1)
    if ids.shape[1] > 1:  # token r is predicted after tokens 0 .. r - 1: the last token is never read
        logits = continuation_logits(model, state, prompts, ids[:, :-1], mask[:, :-1]).float()  # (C, R - 1, V)
        later = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (C, R - 1)
        log_probs = torch.cat((log_probs, later), dim=1)  # (C, R)
        greedy = torch.cat((greedy, logits.argmax(-1) == ids[:, 1:]), dim=1)
    return log_probs, greedy, mask


def score_options(
    model: nn.Module, state: PromptState, options: OptionTokens, style: AnswerStyle, pad_id: int
) -> OptionScores:
    """Option-letter logits (``letter``) or cloze log-likelihoods (``text``), (B, max options), of the prompts
    ``model`` read into ``state`` (see :func:`continuation_scores`); letters need only the state's last logits."""
    if style == "letter":
        return OptionScores(option_logits(state.last_logits.float(), options))
    return continuation_scores(model, state, options, pad_id)


@torch.no_grad()
def score_alone(
    participant: Participant, ids: Tensor, mask: Tensor, options: OptionTokens, style: AnswerStyle
) -> OptionScores:
    """Option scores of left-padded prompts ``ids``/``mask`` (B, N) by the participant alone: the prompts are read
    once, then every option is scored from that read."""
    state = read_prompt(participant.model, ids, mask)
    return score_options(participant.model, state, options, style, participant.tokenizer.pad_token_id)


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
