"""Task-aware sender selection: which senders a receiver should hear from for a question.

- :class:`PriorSelection`: a fixed table task category -> senders, from config (the paper's
  setting: "based on prior knowledge that different models exhibit varying performance across
  different tasks").
- :class:`MeasuredSelection`: ranks senders per category by measured single-sender C2C accuracy
  (e.g. on validation questions) and keeps those that beat the receiver alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from fedrefine.tasks.multiple_choice import MultipleChoiceItem


class SenderSelection:
    """Chooses the sender subset for a question (may be empty: the receiver answers alone)."""

    def select(self, item: MultipleChoiceItem) -> list[str]:
        raise NotImplementedError


@dataclass
class PriorSelection(SenderSelection):
    """A fixed prior table: category -> senders; ``default`` for categories not in it (or no category)."""

    table: dict[str, list[str]] = field(default_factory=dict)
    default: list[str] = field(default_factory=list)

    def select(self, item: MultipleChoiceItem) -> list[str]:
        return list(self.table.get(item.category or "", self.default))


@dataclass
class MeasuredSelection(SenderSelection):
    """Per category, senders ranked by measured accuracy, kept if they beat the receiver alone by ``margin``.

    Build it with :meth:`from_results` from per-question correctness of single-sender routes.
    """

    ranking: dict[str, list[str]] = field(default_factory=dict)
    default: list[str] = field(default_factory=list)
    max_senders: int | None = None

    def select(self, item: MultipleChoiceItem) -> list[str]:
        chosen = self.ranking.get(item.category or "", self.default)
        return list(chosen[: self.max_senders] if self.max_senders else chosen)

    @classmethod
    def from_results(
        cls,
        items: Sequence[MultipleChoiceItem],
        receiver_correct: Sequence[bool],
        sender_correct: Mapping[str, Sequence[bool]],
        margin: float = 0.0,
        max_senders: int | None = None,
    ) -> MeasuredSelection:
        """Rank senders per category from per-question correctness (receiver alone vs C2C with each sender)."""
        categories = sorted({item.category or "" for item in items})
        ranking: dict[str, list[str]] = {}
        for category in categories:
            rows = [i for i, item in enumerate(items) if (item.category or "") == category]
            baseline = sum(receiver_correct[i] for i in rows) / len(rows)
            scores = {name: sum(correct[i] for i in rows) / len(rows) for name, correct in sender_correct.items()}
            ranked = sorted(scores, key=lambda name: (-scores[name], name))
            ranking[category] = [name for name in ranked if scores[name] > baseline + margin]
        overall = {name: sum(c) / len(c) for name, c in sender_correct.items()}
        base = sum(receiver_correct) / len(receiver_correct)
        default = [n for n in sorted(overall, key=lambda n: (-overall[n], n)) if overall[n] > base + margin]
        return cls(ranking, default, max_senders)

    def table(self) -> dict[str, list[str]]:
        """The measured ranking as a prior table (to save into a config)."""
        return {**self.ranking}
