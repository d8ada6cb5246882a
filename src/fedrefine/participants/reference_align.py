"""The C2C reference's token alignment, an option beside :mod:`~fedrefine.participants.align` (character spans).

The reference makes the sender read a sequence built from the receiver's tokens, one sender token per receiver
token, so that receiver column i reads sender column i:

- same vocabulary: the sender reads the receiver's own token ids, chat template included, and every prompt
  token is fused;
- another tokenizer: each message's content tokens are re-encoded one by one (a receiver token's text encoded
  by the sender's tokenizer, its ``first`` token, or its ``longest`` by decoded length) and fused; the chat
  template around them is the sender's own and is not fused.

In both, text appended after the rendered chat (the answer prefix "The correct answer is") is not fused:
the reference runs it with the receiver's plain cache. Unlike the reference, the template sections are not
padded to equal length, so the sender's positions are its own (see ``docs/guides/c2c-fusers.md``).
"""

from __future__ import annotations

from typing import Literal

from transformers import PreTrainedTokenizerBase

from fedrefine.participants.align import UNALIGNED
from fedrefine.participants.chat import EncodedChat

#: How a receiver token that the sender's tokenizer splits is re-encoded: its first piece or its longest.
ReencodeStrategy = Literal["first", "longest"]


def same_vocabulary(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """Whether two tokenizers give every token the same id (the reference then feeds the sender the receiver's ids)."""
    return a is b or (len(a) == len(b) and a.get_vocab() == b.get_vocab())


class Reencoder:
    """One receiver token's id -> the sender token the reference puts in its place (cached per id)."""

    def __init__(
        self, receiver: PreTrainedTokenizerBase, sender: PreTrainedTokenizerBase, strategy: ReencodeStrategy = "first"
    ) -> None:
        if strategy not in ("first", "longest"):
            raise ValueError(f"Unknown re-encoding strategy {strategy!r}; choose 'first' or 'longest'.")
        self.receiver, self.sender, self.strategy = receiver, sender, strategy
        self._cache: dict[int, int] = {}
        self._fallback = sender.unk_token_id if sender.unk_token_id is not None else 0

    def __call__(self, token_id: int) -> int:
        if token_id not in self._cache:
            self._cache[token_id] = self._reencode(token_id)
        return self._cache[token_id]

    def _reencode(self, token_id: int) -> int:
        text = self.receiver.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if token_id in self.receiver.all_special_ids:  # a special token: the sender's of the same role or name
            for role in ("pad_token_id", "eos_token_id", "bos_token_id", "unk_token_id"):
                if getattr(self.receiver, role) == token_id and getattr(self.sender, role) is not None:
                    return getattr(self.sender, role)
            found = self.sender.convert_tokens_to_ids(text)
            return found if isinstance(found, int) and found != self.sender.unk_token_id else self._fallback
        pieces = self.sender.encode(text, add_special_tokens=False)
        if not pieces:
            return self._fallback
        if self.strategy == "first":
            return pieces[0]
        lengths = [len(self.sender.decode([p], skip_special_tokens=False, clean_up_tokenization_spaces=False)) for p in pieces]
        return pieces[lengths.index(max(lengths))]


def _message_of(span: tuple[int, int], content_spans: list[tuple[int, int]]) -> int | None:
    """The message whose content holds a token's last character (None: a template token)."""
    start, end = span
    if end <= start:
        return None
    return next((m for m, (a, b) in enumerate(content_spans) if a <= end - 1 < b), None)


def reference_alignment(
    receiver: EncodedChat, sender: EncodedChat, reencode: Reencoder | None
) -> tuple[list[int], list[int]]:
    """(the sender's token ids, the sender column of each receiver token or -1) as the reference aligns them.

    ``reencode`` None: the tokenizers share their vocabulary and the sender reads ``receiver``'s ids. Otherwise
    the sender's ids are its own template tokens (``sender``) with each message's content in the receiver's
    tokens, re-encoded. Both encodings must hold the same messages.
    """
    if receiver.contents != sender.contents:
        raise ValueError(
            "The reference's token alignment needs the sender and the receiver to read the same messages; got "
            "different contents. Use concat fusion for different texts."
        )
    cut = len(receiver.text) if receiver.rendered_length is None else receiver.rendered_length
    in_chat = [end <= cut and end > start for start, end in receiver.offsets]  # the appended suffix is not fused
    if reencode is None:
        return list(receiver.input_ids), [i if kept else UNALIGNED for i, kept in enumerate(in_chat)]
    receiver_messages = [_message_of(span, receiver.content_spans) for span in receiver.offsets]
    sender_messages = [_message_of(span, sender.content_spans) for span in sender.offsets]
    ids: list[int] = []
    alignment = [UNALIGNED] * len(receiver.input_ids)
    placed: set[int] = set()
    for token_id, message in zip(sender.input_ids, sender_messages):
        if message is None:
            ids.append(token_id)  # the sender's own template
            continue
        if message in placed:
            continue
        placed.add(message)  # the message's content, in the receiver's tokens re-encoded one by one
        for index, (receiver_id, theirs) in enumerate(zip(receiver.input_ids, receiver_messages)):
            if theirs == message:
                alignment[index] = len(ids) if in_chat[index] else UNALIGNED
                ids.append(reencode(receiver_id))
    return ids, alignment
