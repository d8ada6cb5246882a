"""What a route chose per question: option indices, and in cloze mode under every normalisation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedrefine.evaluation.question_batch import QuestionBatch
from fedrefine.tasks.multiple_choice import extract_choice
from fedrefine.tasks.scoring import NORMALIZATIONS, Normalization, OptionScores


@dataclass
class Choices:
    """The option chosen per encoded row (B,), and in cloze mode under each normalisation (B,) too; ``scores``, per
    encoded row, every option's score under each normalisation (``logits`` for letters; empty when generated)."""

    chosen: Tensor
    cloze: dict[str, Tensor] = field(default_factory=dict)
    scores: list[dict[str, list[float]]] = field(default_factory=list)

    @classmethod
    def of(cls, scores: OptionScores, normalization: Normalization) -> Choices:
        """Choices from option scores: under ``normalization`` and, for cloze scores, under each one."""
        cloze = {n: scores.predictions(n) for n in NORMALIZATIONS} if scores.cloze else {}
        by_name = {n: scores.normalized(n) for n in NORMALIZATIONS} if scores.cloze else {"logits": scores.total}
        return cls(scores.predictions(normalization), cloze, option_score_rows(by_name))

    @classmethod
    def concat(cls, parts: Sequence[Choices], rows: Sequence[Sequence[int]], size: int) -> Choices:
        """The choices of ``size`` encoded rows answered in parts (``rows[k]``: where ``parts[k]``'s rows go)."""
        chosen = torch.full((size,), -1, dtype=torch.long)
        cloze = {n: chosen.clone() for n in parts[0].cloze} if parts else {}
        scores: list[dict[str, list[float]]] = [{} for _ in range(size)]
        for part, where in zip(parts, rows):
            chosen[list(where)] = part.chosen.cpu()
            for normalization, picks in part.cloze.items():
                cloze.setdefault(normalization, torch.full((size,), -1, dtype=torch.long))[list(where)] = picks.cpu()
            for row, row_scores in zip(where, part.scores):
                scores[row] = row_scores
        return cls(chosen, cloze, scores)


def option_score_rows(by_name: dict[str, Tensor]) -> list[dict[str, list[float]]]:
    """Per row, every option's score under each name, from (B, K) tensors; the -inf of a ragged row's missing
    options is left out."""
    rows = []
    for index in range(len(next(iter(by_name.values()))) if by_name else 0):
        rows.append({name: [float(v) for v in t[index].tolist() if v != float("-inf")] for name, t in by_name.items()})
    return rows


def extract_choices(texts: Sequence[str], batch: QuestionBatch) -> Tensor:
    """The option each generated text names, per encoded row (B,); -1 where it names none."""
    chosen = []
    for text, row in zip(texts, batch.encoded_rows):
        labels = batch.option_labels[row]
        letter = extract_choice(text, labels)
        chosen.append(labels.index(letter) if letter is not None else -1)
    return torch.tensor(chosen)
