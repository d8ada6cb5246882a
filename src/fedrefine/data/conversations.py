"""Chat conversations in the OpenHermes-2.5 schema, streamed and turned into (prompt messages, response)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
from datasets.distributed import split_dataset_by_node
from torch.utils.data import IterableDataset

from fedrefine.data.loading import read_rows
from fedrefine.participants.chat import Message

ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class ChatExample:
    """A training conversation: the prompt messages and the last assistant turn to supervise."""

    messages: list[Message]
    response: str


#: The column that carries a row's position in its file through shuffling and sharding.
ROW_COLUMN = "_fedrefine_row"
SCHEMA = "conversations = [{'from': 'human'|'gpt'|'system', 'value': str}, ...] (OpenHermes-2.5)"


class TrainingDataError(ValueError):
    """Training data that cannot be used: wrong schema, or no usable conversation at all."""


class UnusableConversation(ValueError):
    """A conversation in the right schema that has nothing to supervise (counted and skipped, not fatal)."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


def conversation_to_example(row: Mapping[str, Any], where: str = "row") -> ChatExample:
    """Turn an OpenHermes row (``conversations``: [{from, value}]) into a prompt and its final answer.

    System turns are dropped. A row in another schema raises :class:`TrainingDataError`; a
    conversation with no assistant turn after a user turn raises :class:`UnusableConversation`
    (the stream counts and skips those).
    """
    turns = row.get("conversations")
    if turns is None:
        other = [key for key in ("messages", "conversation", "text", "prompt") if row.get(key) is not None]
        found = f"it has {other[0]!r} instead" if other else f"its fields are {sorted(k for k in row if k != ROW_COLUMN)}"
        raise TrainingDataError(f"{where} has no 'conversations' field ({found}); chat data needs {SCHEMA}.")
    if isinstance(turns, (str, bytes)) or not isinstance(turns, Sequence):
        raise TrainingDataError(f"{where}: 'conversations' must be a list of turns, got {type(turns).__name__}; expected {SCHEMA}.")
    messages: list[Message] = []
    for turn in turns:
        if not isinstance(turn, Mapping) or turn.get("from") is None or turn.get("value") is None:
            keys = sorted(turn) if isinstance(turn, Mapping) else type(turn).__name__
            raise TrainingDataError(f"{where}: every turn needs 'from' and 'value', got {keys}; expected {SCHEMA}.")
        role = ROLE_NAMES.get(turn["from"])
        if role is None:
            raise TrainingDataError(f"{where}: unknown speaker {turn['from']!r}; expected one of {sorted(ROLE_NAMES)}.")
        if role != "system":
            messages.append({"role": role, "content": str(turn["value"])})
    if len(messages) < 2 or messages[0]["role"] != "user" or messages[-1]["role"] != "assistant":
        roles = [m["role"] for m in messages]
        raise UnusableConversation(where, f"no assistant answer after a user turn (turns: {roles or 'none'})")
    return ChatExample(messages=messages[:-1], response=messages[-1]["content"])


def prefill_response(example: ChatExample, prefill: str, where: str = "row") -> ChatExample:
    """Move the fixed start ``prefill`` of the answer into the prompt as an assistant prefill message.

    Every participant then reads it (senders included) and only the rest of the answer is supervised.
    """
    if not example.response.startswith(prefill) or len(example.response) == len(prefill):
        raise TrainingDataError(
            f"{where}: the answer {example.response[:60]!r} does not start with data.response_prefill={prefill!r} "
            f"followed by more text; unset response_prefill or use data whose answers all start with it."
        )
    return ChatExample([*example.messages, {"role": "assistant", "content": prefill}], example.response[len(prefill) :])


@dataclass
class PassCounts:
    """What one pass over a rank's training rows found."""

    rows_read: int = 0
    usable: int = 0
    skipped_without_answer: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"rows_read": self.rows_read, "usable": self.usable, "skipped_without_answer": self.skipped_without_answer}


def number_rows(rows: datasets.IterableDataset) -> datasets.IterableDataset:
    """Tag every row with its position in the file (:data:`ROW_COLUMN`), before shuffling or sharding."""
    return rows.map(lambda row, index: {ROW_COLUMN: index}, with_indices=True)


class ChatStream(IterableDataset):
    """Streams :class:`ChatExample` from a split, sharded over distributed ranks.

    Rows without a usable assistant answer are skipped and counted per pass (``last_pass``, and
    ``complete_pass`` once a pass has finished; per worker when ``num_workers > 0``). A pass that
    finds no usable row raises :class:`TrainingDataError` naming ``source``, the rows read and why
    each was unusable, instead of letting training spin through empty epochs.
    With ``response_prefill`` every answer's fixed start becomes part of the prompt (:func:`prefill_response`).
    Rows tagged by :func:`number_rows` are named by their position in the file in errors.
    """

    def __init__(
        self,
        rows: datasets.IterableDataset,
        rank: int = 0,
        world_size: int = 1,
        response_prefill: str | None = None,
        source: str = "training data",
    ) -> None:
        super().__init__()
        self.rows = split_dataset_by_node(rows, rank=rank, world_size=world_size) if world_size > 1 else rows
        self.response_prefill, self.source, self.rank = response_prefill, source, rank
        self.passes = 0
        self.last_pass = PassCounts()
        self.complete_pass: PassCounts | None = None
        self.skip_examples = 0

    def resume_after(self, examples: int) -> None:
        """Skip the first ``examples`` usable examples of the next pass (they were trained on before a resume)."""
        self.skip_examples = examples

    def __iter__(self) -> Iterator[ChatExample]:
        self.passes += 1
        counts, skip, self.skip_examples = PassCounts(), self.skip_examples, 0
        self.last_pass, unusable = counts, []
        for position, row in enumerate(read_rows(self.rows, self.source, "data.train_path")):
            counts.rows_read += 1
            where = self.describe_row(row.get(ROW_COLUMN, position))
            try:
                example = conversation_to_example(row, where=where)
            except UnusableConversation as unusable_row:
                counts.skipped_without_answer += 1
                unusable.append((row.get(ROW_COLUMN, position), unusable_row.reason))
                continue
            if self.response_prefill:
                example = prefill_response(example, self.response_prefill, where=where)
            counts.usable += 1
            if counts.usable > skip:
                yield example
        if not counts.usable:
            raise TrainingDataError(self.nothing_usable(counts, unusable))
        self.complete_pass = counts

    @property
    def by_line(self) -> bool:
        """Rows of a JSONL file are named by line (1-based), others by their 0-based position."""
        return str(self.source).endswith(".jsonl")

    def row_number(self, index: int) -> str:
        return str(index + 1) if self.by_line else str(index)

    def describe_row(self, index: int) -> str:
        """``<file> line N`` for a JSONL file, else ``<source> row N``."""
        return f"{self.source} {'line' if self.by_line else 'row'} {self.row_number(index)}"

    def nothing_usable(self, counts: PassCounts, unusable: list[tuple[int, str]]) -> str:
        shard = f" (rank {self.rank}'s shard)" if self.rank else ""
        if not counts.rows_read:
            return (f"{self.source}{shard}: no training rows were read (data.train_samples is 0, or the file or "
                    f"split is empty); point data.train_path at chat data in the schema {SCHEMA}.")
        by_reason: dict[str, list[int]] = {}
        for index, reason in sorted(unusable):
            by_reason.setdefault(reason, []).append(index)
        unit = "line" if self.by_line else "row"
        shown = "; ".join(
            f"{len(rows)} x {reason} ({unit}s {', '.join(self.row_number(i) for i in rows[:5])}"
            f"{f' and {len(rows) - 5} more' if len(rows) > 5 else ''})"
            for reason, rows in by_reason.items()
        )
        return (f"{self.source}{shard}: none of the {counts.rows_read} rows read is usable for training: {shown}. "
                f"Every row needs a user turn followed by an assistant ('gpt') answer.")
