"""Render conversations with a participant's own chat template and encode them with offsets.

Alignment between participants needs to know where each message's *content* sits in the
rendered text: template tokens differ per model and are never fused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from fedrefine.participants.participant import Participant

Message = dict[str, str]
CharSpan = tuple[int, int]


@dataclass(frozen=True)
class EncodedChat:
    """A rendered prompt, its token ids and offsets, and the character span of every message's content;
    ``rendered_length``: where text appended after the rendered chat (a suffix) starts (None: nothing appended)."""

    text: str
    input_ids: list[int]
    offsets: list[CharSpan]
    content_spans: list[CharSpan]
    contents: list[str]
    rendered_length: int | None = None


def _placeholder(index: int) -> str:
    return f"\u2063FEDREFINE_CONTENT_{index}\u2063"


def render_chat(
    participant: Participant, messages: Sequence[Message], add_generation_prompt: bool = True
) -> tuple[str, list[CharSpan]]:
    """Render ``messages`` with the participant's chat template and locate each message's content.

    A final assistant message is a prefill: the prompt ends inside it (``continue_final_message``),
    so every participant reads the start of the answer as message content. Returns the rendered
    text and, per message, the (start, end) character span of its content in that text. Raises if
    a template does not reproduce a message's content verbatim.
    """
    tokenizer = participant.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"Tokenizer of {participant.name} has no chat template; use an instruction-tuned checkpoint "
            f"or set `tokenizer.chat_template`."
        )
    kwargs = dict(participant.chat_template_kwargs)
    prefill = bool(messages) and messages[-1]["role"] == "assistant"
    kwargs.update(continue_final_message=prefill, add_generation_prompt=add_generation_prompt and not prefill)
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, **kwargs
    )
    # Render once more with unique placeholders: they show where each content starts, even when
    # the content also appears inside template text (e.g. a message that says "user").
    marked = tokenizer.apply_chat_template(
        [dict(m, content=_placeholder(i)) for i, m in enumerate(messages)],
        tokenize=False,
        **kwargs,
    )
    spans: list[CharSpan] = []
    shift = 0  # how much longer the real text is than the marked text up to the current point
    cursor = 0
    for index, message in enumerate(messages):
        content = message["content"]
        marker_at = marked.find(_placeholder(index))
        if marker_at < 0:
            raise ValueError(f"The chat template of {participant.name} dropped message {index} ({message['role']}).")
        start = text.find(content, max(cursor, marker_at + shift))
        if start < 0:
            raise ValueError(
                f"The chat template of {participant.name} changes the content of message {index} "
                f"({message['role']}): it cannot be aligned. Strip or normalise the text before sending it."
            )
        spans.append((start, start + len(content)))
        cursor = start + len(content)
        shift = cursor - (marker_at + len(_placeholder(index)))
    return text, spans


def encode_chat(
    participant: Participant, messages: Sequence[Message], add_generation_prompt: bool = True, suffix: str = ""
) -> EncodedChat:
    """Render and tokenize ``messages`` with the participant's own template and tokenizer.

    ``suffix`` is appended to the rendered text (e.g. the start of the assistant's answer); it
    is not message content and is never aligned.
    """
    text, spans = render_chat(participant, messages, add_generation_prompt)
    rendered_length = len(text)
    text += suffix
    encoding = participant.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return EncodedChat(
        text=text,
        input_ids=list(encoding["input_ids"]),
        offsets=[tuple(o) for o in encoding["offset_mapping"]],
        content_spans=spans,
        contents=[m["content"] for m in messages],
        rendered_length=rendered_length,
    )


def truncate_chat(chat: EncodedChat, num_tokens: int) -> EncodedChat:
    """The first ``num_tokens`` tokens of an encoding (text and spans are kept)."""
    return replace(chat, input_ids=chat.input_ids[:num_tokens], offsets=chat.offsets[:num_tokens])
