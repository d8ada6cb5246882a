"""Chat conversations in the OpenHermes-2.5 schema, streamed and turned into (prompt messages, response)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import datasets
from datasets.distributed import split_dataset_by_node
from torch.utils.data import IterableDataset

from fedrefine.chat import Message

ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class ChatExample:
    """A training conversation: the prompt messages and the last assistant turn to supervise."""

    messages: list[Message]
    response: str


def conversation_to_example(row: Mapping[str, Any], where: str = "row") -> ChatExample | None:
    """Turn an OpenHermes row (``conversations``: [{from, value}]) into a prompt and its final answer.

    System turns are dropped. Returns None for a conversation with no assistant turn after a
    user turn (the caller counts those).
    """
    if "conversations" not in row:
        raise ValueError(
            f"{where} has no 'conversations' field; chat data needs the OpenHermes-2.5 schema "
            f"(conversations = [{{'from': 'human'|'gpt'|'system', 'value': str}}, ...])."
        )
    messages: list[Message] = []
    for turn in row["conversations"]:
        if "from" not in turn or "value" not in turn:
            raise ValueError(f"{where}: every turn needs 'from' and 'value', got keys {sorted(turn)}.")
        role = ROLE_NAMES.get(turn["from"])
        if role is None:
            raise ValueError(f"{where}: unknown speaker {turn['from']!r}; expected one of {sorted(ROLE_NAMES)}.")
        if role != "system":
            messages.append({"role": role, "content": str(turn["value"])})
    if len(messages) < 2 or messages[-1]["role"] != "assistant" or messages[0]["role"] != "user":
        return None
    return ChatExample(messages=messages[:-1], response=messages[-1]["content"])


def prefill_response(example: ChatExample, prefill: str, where: str = "row") -> ChatExample:
    """Move the fixed start ``prefill`` of the answer into the prompt as an assistant prefill message.

    Every participant then reads it (senders included) and only the rest of the answer is supervised.
    """
    if not example.response.startswith(prefill) or len(example.response) == len(prefill):
        raise ValueError(
            f"{where}: the answer {example.response[:60]!r} does not start with data.response_prefill={prefill!r} "
            f"followed by more text; unset response_prefill or use data whose answers all start with it."
        )
    return ChatExample([*example.messages, {"role": "assistant", "content": prefill}], example.response[len(prefill) :])


class ChatStream(IterableDataset):
    """Streams :class:`ChatExample` from a split, sharded over distributed ranks.

    Rows without a usable assistant answer are skipped and counted in ``skipped`` (per worker).
    With ``response_prefill`` every answer's fixed start becomes part of the prompt (:func:`prefill_response`).
    """

    def __init__(
        self, rows: datasets.IterableDataset, rank: int = 0, world_size: int = 1, response_prefill: str | None = None
    ) -> None:
        super().__init__()
        self.rows = split_dataset_by_node(rows, rank=rank, world_size=world_size) if world_size > 1 else rows
        self.response_prefill = response_prefill
        self.skipped = 0

    def __iter__(self) -> Iterator[ChatExample]:
        for index, row in enumerate(self.rows):
            example = conversation_to_example(row, where=f"chat row {index}")
            if example is None:
                self.skipped += 1
                continue
            if self.response_prefill:
                example = prefill_response(example, self.response_prefill, where=f"chat row {index}")
            yield example
