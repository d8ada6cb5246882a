"""Token alignment between two tokenizations of the same messages, by character spans.

Each participant tokenizes its own rendering (own chat template, own tokenizer, with
offsets). A receiver token is aligned when its last character lies in a message's content;
it gets the sender token that covers the same character of the same message's content in
the sender's rendering. Template tokens are never aligned.
"""

from __future__ import annotations

from typing import Literal

from fedrefine.participants.chat import EncodedChat

UNALIGNED = -1
#: Which messages' tokens are aligned: ``all``, or only the ``last`` one (e.g. an answer prefix every participant
#: reads, after a question each sender read in its own rephrasing).
AlignedMessages = Literal["all", "last"]


def _char_owners(encoded: EncodedChat) -> list[int]:
    """For each character of the text, the index of the last token whose span covers it (or -1).

    "Last" matters for byte-level tokenizers that split one character over several tokens:
    the last fragment is the first position that has seen the whole character.
    """
    owners = [UNALIGNED] * len(encoded.text)
    for token_index, (start, end) in enumerate(encoded.offsets):
        for char in range(start, end):
            owners[char] = token_index
    return owners


def align_tokens(
    receiver: EncodedChat, sender: EncodedChat, strict: bool = True, messages: AlignedMessages = "all"
) -> list[int]:
    """For every receiver token, the sender token index it reads from, or ``UNALIGNED`` (-1).

    Both encodings must hold the same messages' contents (same order, same text). With
    ``strict=False`` (used by controls that feed the sender another text) contents may differ:
    the same character offset within each message is used, clamped to the sender's message.
    ``messages="last"`` aligns only the last message's tokens, and only that message must be the
    same text (the others may differ: each sender read its own rephrasing of the question).
    """
    if messages not in ("all", "last"):
        raise ValueError(f"Unknown aligned messages {messages!r}; choose 'all' or 'last'.")
    compared = slice(-1, None) if messages == "last" else slice(None)
    same = receiver.contents[compared] == sender.contents[compared]
    if len(receiver.contents) != len(sender.contents) or not receiver.contents or (strict and not same):
        raise ValueError(
            "Residual fusion needs the sender and receiver to read the same messages; got different contents"
            + (" in the last message (the answer prefix every participant reads)" if messages == "last" else "")
            + ". Use concat fusion for different texts."
        )
    first_aligned = len(receiver.content_spans) - 1 if messages == "last" else 0
    owners = _char_owners(sender)
    alignment = [UNALIGNED] * len(receiver.input_ids)
    for token_index, (start, end) in enumerate(receiver.offsets):
        if end <= start:
            continue
        last_char = end - 1
        for message_index, (span_start, span_end) in enumerate(receiver.content_spans):
            if message_index >= first_aligned and span_start <= last_char < span_end:
                sender_start, sender_end = sender.content_spans[message_index]
                char = min(sender_start + (last_char - span_start), sender_end - 1)
                # A character no sender token covers (e.g. dropped whitespace): use the nearest
                # covered character before it within the same message.
                while char >= sender_start and owners[char] == UNALIGNED:
                    char -= 1
                if char >= sender_start:
                    alignment[token_index] = owners[char]
                break
    return alignment
