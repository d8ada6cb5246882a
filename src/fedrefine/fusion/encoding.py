"""Encoding prompts for a receiver and its senders: each participant's own chat template and tokenizer,
aligned to the receiver by character spans when the fusion needs it, then padded into a batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fedrefine.fusion.batch import FusionBatch, FusionExample, SenderExample, collate_examples
from fedrefine.participants import Participant
from fedrefine.participants.align import AlignedMessages, align_tokens
from fedrefine.participants.chat import EncodedChat, Message, encode_chat
from fedrefine.participants.reference_align import Reencoder, reference_alignment, same_vocabulary


def encode_response(participant: Participant, response: str) -> list[int]:
    """Token ids of an assistant response, closed by the participant's end-of-turn token."""
    ids = participant.tokenizer(response, add_special_tokens=False)["input_ids"]
    return [*ids, participant.end_of_turn_token_id]


class PromptEncoder:
    """Encodes conversations for one receiver and named senders into :class:`FusionExample` / :class:`FusionBatch`.

    Args:
        receiver: the participant that answers.
        senders: sender name -> participant.
        aligns: residual fusion reads sender tokens at the receiver's positions, so each sender's
            tokens are aligned to the receiver's; concat fusion needs no alignment.
        aligned_messages: which messages' tokens are aligned (``last``: only the last one, which is then the
            only one that must be the same text; see :func:`~fedrefine.participants.align.align_tokens`).
        alignments: sender name -> its fuser's ``token_alignment`` (absent: ``spans``); the C2C reference's
            (``reference``, ``reference_longest``) builds the sender's tokens from the receiver's (see
            :mod:`~fedrefine.participants.reference_align`).
    """

    def __init__(
        self, receiver: Participant, senders: Mapping[str, Participant], aligns: bool,
        aligned_messages: AlignedMessages = "all", alignments: Mapping[str, str] | None = None,
    ) -> None:
        self.receiver, self.senders, self.aligns = receiver, dict(senders), aligns
        self.aligned_messages = aligned_messages
        #: sender name -> its re-encoder (None: it shares the receiver's vocabulary), for the reference's alignment
        self.reference: dict[str, Reencoder | None] = {}
        for name, kind in (alignments or {}).items():
            if kind != "spans" and aligns:
                tokenizer = self.senders[name].tokenizer
                shared = same_vocabulary(receiver.tokenizer, tokenizer)
                strategy = "longest" if kind == "reference_longest" else "first"
                self.reference[name] = None if shared else Reencoder(receiver.tokenizer, tokenizer, strategy)

    def encode(
        self,
        messages: Sequence[Message],
        response: str | None = None,
        senders: Sequence[str] | None = None,
        sender_messages: Mapping[str, Sequence[Message]] | None = None,
        strict: bool = True,
    ) -> FusionExample:
        """Encode a conversation for the receiver and each named sender (default: all).

        ``sender_messages`` gives a sender another text than the receiver's (concat fusion, or
        controls with ``strict=False``).
        """
        names = list(self.senders) if senders is None else list(senders)
        sender_chats = {n: encode_chat(self.senders[n], (sender_messages or {}).get(n, messages)) for n in names}
        response_ids = None if response is None else encode_response(self.receiver, response)
        return self.encode_chats(encode_chat(self.receiver, messages), sender_chats, response_ids, strict)

    def encode_chats(
        self,
        receiver_chat: EncodedChat,
        sender_chats: Mapping[str, EncodedChat],
        response_ids: list[int] | None = None,
        strict: bool = True,
    ) -> FusionExample:
        """A :class:`FusionExample` from encodings made elsewhere (e.g. multiple-choice prompts)."""
        senders = {}
        for name, chat in sender_chats.items():
            if name in self.reference:
                senders[name] = SenderExample(*reference_alignment(receiver_chat, chat, self.reference[name]))
                continue
            alignment = align_tokens(receiver_chat, chat, strict, self.aligned_messages) if self.aligns else None
            senders[name] = SenderExample(chat.input_ids, alignment)
        return FusionExample(receiver_chat.input_ids, senders, response_ids)

    def collate(self, examples: Sequence[FusionExample]) -> FusionBatch:
        """Pad examples with each participant's own pad token."""
        pads = {name: s.tokenizer.pad_token_id for name, s in self.senders.items()}
        return collate_examples(examples, self.receiver.tokenizer.pad_token_id, pads)
