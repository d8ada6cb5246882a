"""Multiple-choice questions in the OpenBookQA schema: validation, the zero-shot prompt, how options are named.

The prompt is one user message; the assistant's answer starts with :data:`ANSWER_PREFIX`.
:mod:`fedrefine.scoring` scores the options (letter logits or cloze); :func:`extract_choice`
reads the choice out of generated text.
The toy world trains its tiny models on exactly this rendering.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fedrefine.chat import EncodedChat, Message, encode_chat, truncate_chat
from fedrefine.participants import Participant

ANSWER_PREFIX = "The correct answer is"
#: How the assistant names its choice: by the option's letter, or by the option's text (cloze).
AnswerStyle = Literal["letter", "text"]
INSTRUCTIONS: dict[str, str] = {
    "letter": "Answer with the letter of the correct option.",
    "text": "Answer with the correct option.",
}
REQUIRED_FIELDS = ("id", "question_stem", "choices", "answerKey")


class DatasetSchemaError(ValueError):
    """A row does not follow the OpenBookQA schema."""


@dataclass(frozen=True)
class MultipleChoiceItem:
    """One question: id, stem, option texts and labels, the correct label, and an optional task category."""

    id: str
    question_stem: str
    choices: tuple[str, ...]
    labels: tuple[str, ...]
    answer_key: str
    category: str | None = None

    @property
    def answer_index(self) -> int:
        return self.labels.index(self.answer_key)

    @classmethod
    def from_row(cls, row: Mapping[str, Any], where: str = "row") -> MultipleChoiceItem:
        """Validate one OpenBookQA-schema row (id, question_stem, choices{text,label}, answerKey)."""
        missing = [f for f in REQUIRED_FIELDS if row.get(f) is None]
        if missing:
            raise DatasetSchemaError(
                f"{where} is missing field(s) {missing}; OpenBookQA rows need {list(REQUIRED_FIELDS)} "
                f"with choices = {{'text': [...], 'label': [...]}}."
            )
        choices = row["choices"]
        if not isinstance(choices, Mapping) or "text" not in choices or "label" not in choices:
            raise DatasetSchemaError(f"{where}: 'choices' must be a mapping with 'text' and 'label' lists.")
        texts, labels = tuple(str(t) for t in choices["text"]), tuple(str(label) for label in choices["label"])
        if len(texts) != len(labels) or len(labels) < 2:
            raise DatasetSchemaError(f"{where}: 'choices' needs at least two options with one label each.")
        if len(set(labels)) != len(labels):
            raise DatasetSchemaError(f"{where}: option labels {list(labels)} are not unique.")
        answer = str(row["answerKey"]).strip()
        if answer not in labels:
            raise DatasetSchemaError(
                f"{where} (id {row['id']!r}): answerKey {answer!r} is not among the option labels {list(labels)}; "
                f"fix the answerKey or the labels."
            )
        category = row.get("category")
        return cls(str(row["id"]), str(row["question_stem"]), texts, labels, answer, None if category is None else str(category))


def question_text(item: MultipleChoiceItem, style: AnswerStyle = "letter") -> str:
    """The user message: question, lettered options, instruction."""
    options = "\n".join(f"{label}. {text}" for label, text in zip(item.labels, item.choices))
    return f"Question: {item.question_stem}\n{options}\n{INSTRUCTIONS[style]}"


def question_messages(item: MultipleChoiceItem, style: AnswerStyle = "letter", prefill: bool = False) -> list[Message]:
    """The question as a user message; with ``prefill``, followed by :data:`ANSWER_PREFILL`."""
    return with_answer_prefill([{"role": "user", "content": question_text(item, style)}], prefill)


#: The start of the answer as an assistant prefill: participants that read it (senders included)
#: have read the whole prompt up to where the answer is named.
ANSWER_PREFILL: Message = {"role": "assistant", "content": ANSWER_PREFIX}


def with_answer_prefill(messages: Sequence[Message], prefill: bool = True) -> list[Message]:
    """``messages`` followed by :data:`ANSWER_PREFILL` (unchanged without ``prefill``)."""
    return [*messages, dict(ANSWER_PREFILL)] if prefill else list(messages)


def answer_text(label: str) -> str:
    """The assistant's full answer naming option ``label`` by its letter."""
    return f"{ANSWER_PREFIX} {label}."


def correct_answer(item: MultipleChoiceItem, style: AnswerStyle = "letter") -> str:
    """The assistant's full correct answer in ``style`` (what tiny models and fusers train on)."""
    named = item.answer_key if style == "letter" else item.choices[item.answer_index]
    return f"{ANSWER_PREFIX} {named}."


@dataclass(frozen=True)
class EncodedQuestion:
    """A question encoded for one participant: the prompt through :data:`ANSWER_PREFIX`, each option's
    first token, and (text style) each option's full continuation tokens."""

    chat: EncodedChat
    option_token_ids: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...] = ()


def encode_question(
    participant: Participant, item: MultipleChoiceItem, style: AnswerStyle = "letter", prefill: bool = False
) -> EncodedQuestion:
    """Encode the question's prompt through :data:`ANSWER_PREFIX` and find how each option is named.

    ``letter``: the token of each option's letter. ``text``: each option's text continuation (cloze).
    ``prefill``: the answer prefix is an assistant prefill (message content) rather than appended text;
    the rendered prompt is the same.
    """
    messages = question_messages(item, style, prefill)
    if style == "letter":
        return encode_options_prompt(participant, messages, item.labels)
    encoded = encode_options_prompt(participant, messages, item.choices, distinct_first_token=False)
    if any(not c for c in encoded.continuations):
        raise ValueError(f"Question {item.id}: two options have the same text; cloze scoring cannot tell them apart.")
    return encoded


def encode_options_prompt(
    participant: Participant, messages: Sequence[Message], answers: Sequence[str], distinct_first_token: bool = True
) -> EncodedQuestion:
    """Encode any conversation ending in a multiple-choice question, through :data:`ANSWER_PREFIX`.

    The prompt is tokenized with each answer (a letter, or an option's text) appended; the
    tokens all variants share are the context, and each variant's remaining tokens are its
    continuation, whose first token names it. Tokenizers that merge the answer with the space
    before it and those that do not are both handled. Letters must differ in their first token.
    Conversations that end with :data:`ANSWER_PREFILL` already hold the prefix.
    """
    prefix = "" if messages[-1] == ANSWER_PREFILL else ANSWER_PREFIX
    variants = [encode_chat(participant, messages, suffix=f"{prefix} {answer}") for answer in answers]
    ids = [v.input_ids for v in variants]
    shared = 0
    while all(len(row) > shared for row in ids) and len({row[shared] for row in ids}) == 1:
        shared += 1
    candidates = tuple(row[shared] if len(row) > shared else -1 for row in ids)
    if distinct_first_token and (-1 in candidates or len(set(candidates)) != len(candidates)):
        raise ValueError(
            f"Tokenizer of {participant.name} cannot tell the option labels {list(answers)} apart by one token "
            f"after {ANSWER_PREFIX!r}; use single-character labels."
        )
    continuations = tuple(tuple(row[shared:]) for row in ids)
    return EncodedQuestion(truncate_chat(variants[0], shared), candidates, continuations)


_STATED = re.compile(r"answer(?: is|:)\s*\(?([A-Za-z])\b", re.IGNORECASE)
_LEADING = re.compile(r"^\s*\(?([A-Z])(?:[.):]|\s*$)")


def extract_choice(text: str, labels: Sequence[str]) -> str | None:
    """The option label a generated answer names, or None (counted wrong, never skipped).

    In order: "answer is X" / "answer: X"; a leading "X." / "(X)" / "X)"; otherwise the one
    option letter standing alone in the text (none or several: None).
    """
    for pattern in (_STATED, _LEADING):
        match = pattern.search(text)
        if match and match.group(1).upper() in labels:
            return match.group(1).upper()
    standalone = {t for t in re.findall(r"\b([A-Z])\b", text) if t in labels}
    return standalone.pop() if len(standalone) == 1 else None
