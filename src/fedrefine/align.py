"""Token alignment between two tokenizations of the same messages, by character spans.

Each participant tokenizes its own rendering (own chat template, own tokenizer, with
offsets). A receiver token is aligned when its last character lies in a message's content;
it gets the sender token that covers the same character of the same message's content in
the sender's rendering. Template tokens are never aligned.
"""

from __future__ import annotations

from fedrefine.chat import EncodedChat

UNALIGNED = -1


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


def align_tokens(receiver: EncodedChat, sender: EncodedChat, strict: bool = True) -> list[int]:
    """For every receiver token, the sender token index it reads from, or ``UNALIGNED`` (-1).

    Both encodings must hold the same messages' contents (same order, same text). With
    ``strict=False`` (used by controls that feed the sender another text) contents may differ:
    the same character offset within each message is used, clamped to the sender's message.
    """
    if len(receiver.contents) != len(sender.contents) or (strict and receiver.contents != sender.contents):
        raise ValueError(
            "Residual fusion needs the sender and receiver to read the same messages; got different contents. "
            "Use concat fusion for different texts."
        )
    owners = _char_owners(sender)
    alignment = [UNALIGNED] * len(receiver.input_ids)
    for token_index, (start, end) in enumerate(receiver.offsets):
        if end <= start:
            continue
        last_char = end - 1
        for message_index, (span_start, span_end) in enumerate(receiver.content_spans):
            if span_start <= last_char < span_end:
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
