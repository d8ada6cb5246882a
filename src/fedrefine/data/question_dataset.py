"""Multiple-choice evaluation data (OpenBookQA schema) with the partners the controls need."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice

from torch.utils.data import Dataset

from fedrefine.data.loading import open_dataset, read_rows
from fedrefine.tasks.multiple_choice import MultipleChoiceItem


def load_questions(
    path_or_id: str, split: str, config_name: str | None = "main", limit: int | None = None, option: str = "path"
) -> list[MultipleChoiceItem]:
    """Every row of the split (or the first ``limit``), validated; a bad row is an error naming it."""
    rows = open_dataset(path_or_id, split, config_name, streaming=True, option=option)
    items = [
        MultipleChoiceItem.from_row(row, where=f"{path_or_id} [{split}] row {index}")
        for index, row in enumerate(islice(read_rows(rows, path_or_id.replace("{split}", split), option), limit))
    ]
    if not items:
        raise ValueError(f"{path_or_id} [{split}] holds no questions.")
    return items


def reorder_options(item: MultipleChoiceItem, shift: int = 1) -> MultipleChoiceItem:
    """The same question with option texts rotated under fixed labels (the correct letter moves)."""
    n = len(item.choices)
    texts = tuple(item.choices[(i - shift) % n] for i in range(n))
    answer = item.labels[(item.answer_index + shift) % n]
    return MultipleChoiceItem(f"{item.id}/reordered", item.question_stem, texts, item.labels, answer, item.category, item.private_text)


@dataclass(frozen=True)
class QuestionWithControls:
    """A question, a different question with another correct letter, and the question with options reordered."""

    item: MultipleChoiceItem
    mismatched: MultipleChoiceItem
    reordered: MultipleChoiceItem


class QuestionDataset(Dataset):
    """Questions in a fixed order, each with its control partners (deterministic).

    The mismatched partner is the first question with another stem and another correct letter,
    searched from half the set away: neighbouring rows often share a topic (the toy world lists
    each entity's facts together), and a sender reading a question on the same topic would still
    carry that topic's facts.
    """

    def __init__(self, items: list[MultipleChoiceItem]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> QuestionWithControls:
        item = self.items[index]
        partner, count = item, len(self.items)
        for step in range(count // 2, count // 2 + count):
            candidate = self.items[(index + step) % count]
            if candidate.answer_key != item.answer_key and candidate.question_stem != item.question_stem:
                partner = candidate
                break
        return QuestionWithControls(item, partner, reorder_options(item))
