"""Multiple-choice questions in the OpenBookQA schema: validation, the zero-shot prompt, how options are named.

Three prompt styles (:data:`PromptStyle`):

- ``chat``: one user message (question, lettered options, instruction) in the participant's chat
  template; the assistant's answer starts with :data:`ANSWER_PREFIX`. The toy world trains its tiny
  models on exactly this rendering.
- ``lm_eval``: lm-evaluation-harness's stock OpenBookQA prompt: the bare question stem as the
  context (no chat template, options or instruction), each option scored as ``" " + text``.
- ``c2c_reference``: the C2C reference's multiple-choice user message (its instructions, options "A. ..."
  lettered by position, ending "The correct answer is") in the chat template, thinking disabled; scored by the
  letter logits after a further "The correct answer is", or answered by greedy generation.

:mod:`fedrefine.tasks.scoring` scores the options (letter logits or cloze); :func:`extract_choice`
reads the choice out of generated text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fedrefine.participants import Participant
from fedrefine.participants.chat import EncodedChat, Message, encode_chat, truncate_chat

ANSWER_PREFIX = "The correct answer is"
#: How the assistant names its choice: by the option's letter, or by the option's text (cloze).
AnswerStyle = Literal["letter", "text"]
INSTRUCTIONS: dict[str, str] = {
    "letter": "Answer with the letter of the correct option.",
    "text": "Answer with the correct option.",
}
REQUIRED_FIELDS = ("id", "question_stem", "choices", "answerKey")
#: ``chat``: the project's chat prompt; ``lm_eval``: lm-eval-harness's stock OpenBookQA prompt (bare stem);
#: ``c2c_reference``: the C2C reference's multiple-choice prompt.
PromptStyle = Literal["chat", "lm_eval", "c2c_reference"]
PROMPT_STYLES: tuple[str, ...] = ("chat", "lm_eval", "c2c_reference")
#: The C2C reference's user message for a multiple-choice question (its template without chain of thought).
C2C_REFERENCE_PROMPT = (
    "Accurately answer the following question:\n\n{question}\n\nChoices:\n{choices}\n\nInstructions:\n"
    "- Carefully read the question and all options.\n- Select the single most correct answer.\n"
    '- Respond ONLY in the following format: "The correct answer is A/B/C/D".\n'
    "- Do not include any explanations, additional text, or punctuation besides the answer.\n\n"
    "The correct answer is"
)
#: What separates the context from an option's text in a cloze continuation (lm-eval's default
#: ``target_delimiter``): every option is scored as ``" " + text``.
OPTION_DELIMITER = " "


class DatasetSchemaError(ValueError):
    """A row does not follow the OpenBookQA schema."""


@dataclass(frozen=True)
class MultipleChoiceItem:
    """One question: id, stem, option texts and labels, the correct label, an optional task category, and
    optionally the span of the stem the user wants no other model to see (``private_text``: details about
    themselves that the answer does not need; privacy reports count how much of it reaches senders)."""

    id: str
    question_stem: str
    choices: tuple[str, ...]
    labels: tuple[str, ...]
    answer_key: str
    category: str | None = None
    private_text: str | None = None

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
        category, private = row.get("category"), row.get("private_text")
        if private is not None and str(private) not in str(row["question_stem"]):
            raise DatasetSchemaError(
                f"{where} (id {row['id']!r}): private_text {private!r} is not part of the question_stem; it must "
                f"be the exact span of the stem that is private."
            )
        return cls(
            str(row["id"]), str(row["question_stem"]), texts, labels, answer,
            None if category is None else str(category), None if private is None else str(private),
        )


def question_text(item: MultipleChoiceItem, style: AnswerStyle = "letter", prompt_style: PromptStyle = "chat") -> str:
    """The user message: question, lettered options, instruction (``c2c_reference``: the reference's, see
    :data:`C2C_REFERENCE_PROMPT`; options lettered A, B, ... by position, each line "A. text")."""
    if prompt_style == "c2c_reference":
        choices = "".join(f"{letter}. {text}\n" for letter, text in zip(position_letters(item), item.choices))
        return C2C_REFERENCE_PROMPT.replace("{question}", item.question_stem, 1).replace("{choices}", choices, 1)
    options = "\n".join(f"{label}. {text}" for label, text in zip(item.labels, item.choices))
    return f"Question: {item.question_stem}\n{options}\n{INSTRUCTIONS[style]}"


def position_letters(item: MultipleChoiceItem) -> tuple[str, ...]:
    """A, B, C, ... one per option: how the C2C reference letters options, whatever the dataset's labels."""
    return tuple(chr(ord("A") + i) for i in range(len(item.choices)))


def question_messages(
    item: MultipleChoiceItem, style: AnswerStyle = "letter", prefill: bool = False, prompt_style: PromptStyle = "chat"
) -> list[Message]:
    """The question as a user message; with ``prefill``, followed by :data:`ANSWER_PREFILL`."""
    return with_answer_prefill([{"role": "user", "content": question_text(item, style, prompt_style)}], prefill)


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
class ClozeOptions:
    """A question's options as cloze continuations: each option's token ids after the prompt, and its
    text's length in characters (lm-eval's ``acc_norm`` divides by it: the option text, not the delimiter)."""

    continuations: tuple[tuple[int, ...], ...]
    chars: tuple[int, ...]


@dataclass(frozen=True)
class EncodedQuestion:
    """A question encoded for one participant: the prompt (chat style: through :data:`ANSWER_PREFIX`),
    each option's first token, and (text style) each option's cloze continuation."""

    chat: EncodedChat
    option_token_ids: tuple[int, ...]
    cloze: ClozeOptions | None = None

    @property
    def continuations(self) -> tuple[tuple[int, ...], ...]:
        """Each option's continuation token ids (text style; empty for letters)."""
        return () if self.cloze is None else self.cloze.continuations


def encode_question(
    participant: Participant,
    item: MultipleChoiceItem,
    style: AnswerStyle = "letter",
    prefill: bool = False,
    prompt_style: PromptStyle = "chat",
) -> EncodedQuestion:
    """Encode the question's prompt and find how each option is named.

    ``letter``: the token of each option's letter after :data:`ANSWER_PREFIX`. ``text``: each option's
    cloze continuation (see :func:`encode_cloze`). ``prefill``: the answer prefix is an assistant prefill
    (message content) rather than appended text; the rendered prompt is the same. ``prompt_style``
    ``lm_eval``: the bare question stem (text style only, no prefill; see :func:`encode_lm_eval_question`).
    """
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"Unknown prompt_style {prompt_style!r}; choose one of {list(PROMPT_STYLES)}.")
    if prompt_style == "lm_eval":
        if style != "text" or prefill:
            raise ValueError(
                "prompt_style 'lm_eval' is lm-eval's bare-stem prompt: it scores option texts (answer style 'text', "
                "evaluation.answer_mode cloze) and has no answer prefix to prefill (evaluation.prefill_answer false)."
            )
        return encode_lm_eval_question(participant, item)
    messages = question_messages(item, style, prefill, prompt_style)
    if prompt_style == "c2c_reference":
        if style != "letter":
            raise ValueError("prompt_style 'c2c_reference' names the answer by its letter (answer_mode logits or generate).")
        return encode_options_prompt(participant, messages, position_letters(item))
    if style == "letter":
        return encode_options_prompt(participant, messages, item.labels)
    return encode_cloze_prompt(participant, messages, item)


def encode_cloze_prompt(participant: Participant, messages: Sequence[Message], item: MultipleChoiceItem) -> EncodedQuestion:
    """Chat style, cloze: the conversation rendered through :data:`ANSWER_PREFIX` is the context, and each
    option is scored as ``" " + text`` after it (see :func:`encode_cloze`).

    Conversations that end with :data:`ANSWER_PREFILL` already hold the prefix.
    """
    prefix = "" if messages[-1] == ANSWER_PREFILL else ANSWER_PREFIX
    return encode_cloze(participant, encode_chat(participant, messages, suffix=prefix), item)


def encode_lm_eval_question(participant: Participant, item: MultipleChoiceItem) -> EncodedQuestion:
    """lm-eval-harness's stock OpenBookQA prompt: the bare question stem is the context, each option is
    scored as ``" " + text``.

    The stem is tokenized as lm-eval's ``hf`` model tokenizes a context: with the tokenizer's own
    special tokens (e.g. a Llama tokenizer's BOS). As lm-eval does, whitespace at the end of the stem
    moves to the start of every continuation. The whole stem is the one message content (for alignment).
    """
    stem = item.question_stem.rstrip()
    if not stem:
        raise ValueError(f"Question {item.id}: the question stem is empty; lm_eval-style prompts are the stem alone.")
    encoding = participant.tokenizer(stem, return_offsets_mapping=True)
    context = EncodedChat(
        text=stem,
        input_ids=list(encoding["input_ids"]),
        offsets=[tuple(o) for o in encoding["offset_mapping"]],
        content_spans=[(0, len(stem))],
        contents=[stem],
    )
    delimiter = item.question_stem[len(stem) :] + OPTION_DELIMITER
    return encode_cloze(participant, context, item, delimiter, add_special_tokens=True)


def encode_cloze(
    participant: Participant,
    context: EncodedChat,
    item: MultipleChoiceItem,
    delimiter: str = OPTION_DELIMITER,
    add_special_tokens: bool = False,
) -> EncodedQuestion:
    """Each option's continuation after ``context``, split as lm-eval's ``hf`` model splits it.

    The context's text plus ``delimiter + option`` is tokenized whole, and the continuation is what
    follows the first ``len(context.input_ids)`` tokens. The model reads the context's own tokens
    followed by that tail, exactly as lm-eval feeds it; where a tokenizer merges across the boundary
    (rare: contexts end in a word, options start with a space) the tail differs from the option's own
    tokens, and both tools score the same ids. ``add_special_tokens`` must match how ``context`` was
    tokenized. Options must be non-empty and tokenize differently.
    """
    if context.text != context.text.rstrip():
        raise ValueError("A cloze context must not end in whitespace; move it into the delimiter (as lm-eval does).")
    if any(not text for text in item.choices):
        raise ValueError(f"Question {item.id}: an option's text is empty; cloze scoring needs text to score.")
    cut = len(context.input_ids)
    continuations = []
    for text in item.choices:
        whole = participant.tokenizer(context.text + delimiter + text, add_special_tokens=add_special_tokens)["input_ids"]
        continuations.append(tuple(whole[cut:]))
    if any(not c for c in continuations) or len(set(continuations)) != len(continuations):
        raise ValueError(
            f"Question {item.id}: two options have the same text or the same tokens for {participant.name}; "
            f"cloze scoring cannot tell them apart."
        )
    cloze = ClozeOptions(tuple(continuations), tuple(len(text) for text in item.choices))
    return EncodedQuestion(context, tuple(c[0] for c in continuations), cloze)


def encode_options_prompt(participant: Participant, messages: Sequence[Message], answers: Sequence[str]) -> EncodedQuestion:
    """Encode any conversation ending in a multiple-choice question, through :data:`ANSWER_PREFIX`, for
    answers named by one token (option letters).

    The prompt is tokenized with each answer appended; the tokens all variants share are the
    context, and each variant's next token names it. Tokenizers that merge the answer with the space
    before it and those that do not are both handled. Letters must differ in their first token.
    Conversations that end with :data:`ANSWER_PREFILL` already hold the prefix. Option texts are
    scored by :func:`encode_cloze_prompt` instead.
    """
    prefix = "" if messages[-1] == ANSWER_PREFILL else ANSWER_PREFIX
    variants = [encode_chat(participant, messages, suffix=f"{prefix} {answer}") for answer in answers]
    ids = [v.input_ids for v in variants]
    shared = 0
    while all(len(row) > shared for row in ids) and len({row[shared] for row in ids}) == 1:
        shared += 1
    candidates = tuple(row[shared] if len(row) > shared else -1 for row in ids)
    if -1 in candidates or len(set(candidates)) != len(candidates):
        raise ValueError(
            f"Tokenizer of {participant.name} cannot tell the option labels {list(answers)} apart by one token "
            f"after {ANSWER_PREFIX!r}; use single-character labels."
        )
    return EncodedQuestion(truncate_chat(variants[0], shared), candidates)


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
