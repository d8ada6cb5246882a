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
    """The option chosen per encoded row (B,), and in cloze mode under each normalisation (B,) too."""

    chosen: Tensor
    cloze: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, scores: OptionScores, normalization: Normalization) -> Choices:
        """Choices from option scores: under ``normalization`` and, for cloze scores, under each one."""
        cloze = {n: scores.predictions(n) for n in NORMALIZATIONS} if scores.cloze else {}
        return cls(scores.predictions(normalization), cloze)


def extract_choices(texts: Sequence[str], batch: QuestionBatch) -> Tensor:
    """The option each generated text names, per encoded row (B,); -1 where it names none."""
    chosen = []
    for text, row in zip(texts, batch.encoded_rows):
        labels = batch.option_labels[row]
        letter = extract_choice(text, labels)
        chosen.append(labels.index(letter) if letter is not None else -1)
    return torch.tensor(chosen)
