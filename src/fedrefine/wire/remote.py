"""Senders in other processes: what a receiver asks of a remote sender, what comes back, and why one may not.

A :class:`RemoteSender` is reached over some transport (``fedrefine.runtime`` implements it over gRPC).
It prefills the receiver's request and returns a :class:`Delivery`: the decoded, validated
:class:`~fedrefine.wire.message.KVMessage` with the time and bytes the transport measured. A sender that is
down, slower than its deadline, refuses the call, or returns an invalid message raises
:class:`SenderUnavailable`; the receiver then answers with the senders that did arrive.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from fedrefine.participants.generation import Reply
from fedrefine.participants.sources import ParticipantSource
from fedrefine.wire.message import KVMessage

#: Why a sender did not contribute to a query (the result rows count them by these names).
DROP_REASONS: tuple[str, ...] = (
    "unreachable", "deadline", "refused", "invalid_message", "missing_layers", "non_finite", "identity", "error",
)


class SenderUnavailable(RuntimeError):
    """A sender that could not contribute to a query: ``reason`` is one of :data:`DROP_REASONS`."""

    def __init__(self, sender: str, reason: str, detail: str) -> None:
        if reason not in DROP_REASONS:
            raise ValueError(f"Unknown drop reason {reason!r}; use one of {DROP_REASONS}.")
        super().__init__(f"Sender {sender} {reason}: {detail}")
        self.sender, self.reason, self.detail = sender, reason, detail

    @property
    def why(self) -> str:
        """``reason: detail``, as result rows record it (the reason first, so rows can be counted by it)."""
        return f"{self.reason}: {self.detail}"


@dataclass(frozen=True)
class Delivery:
    """One remote prefill as the receiver got it.

    ``seconds``: the call's wall time at the receiver; ``sender_seconds``: the sender's own prefill and
    encoding time (it reports them); ``transport_bytes``: bytes the transport carried for the reply
    (serialised payload plus gRPC message framing).
    """

    message: KVMessage
    seconds: float
    sender_seconds: float
    transport_bytes: int

    @property
    def transfer_seconds(self) -> float:
        """Time on the wire (and in the transport's stacks): the call's wall time less the sender's work."""
        return max(0.0, self.seconds - self.sender_seconds)


@dataclass(frozen=True)
class HintDelivery:
    """One remote T2T call: the replies (each with its share of the sender's generation time), the call's wall
    time at the receiver, and the bytes the transport carried."""

    replies: list[Reply]
    seconds: float
    transport_bytes: int

    @property
    def transfer_seconds(self) -> float:
        return max(0.0, self.seconds - sum(r.seconds for r in self.replies))


class RemoteSender(ABC):
    """A sender in another process, reached by ``endpoint``."""

    endpoint: str

    @abstractmethod
    def prefill(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        layers: Sequence[int],
        sent: Tensor | None,
        codec: str,
        group_size: int,
        trained_for: Sequence[str],
        max_message_bytes: int,
    ) -> Delivery:
        """Prefill the left-padded prompts ``input_ids``/``attention_mask`` (B, N) (the sender's own tokens) and
        return the ``layers`` at the ``sent`` positions (B, N) (None: all) through ``codec``; raises
        :class:`SenderUnavailable`."""

    @abstractmethod
    def hints(self, prompts: Sequence[str], max_new_tokens: int, batch_size: int) -> HintDelivery:
        """T2T: the sender's greedy reply to each prompt; raises :class:`SenderUnavailable`."""

    def close(self) -> None:
        """Release the connection."""


class RemoteSource(ParticipantSource):
    """A participant served elsewhere: :meth:`load` gives the receiver's local view of it (tokenizer, chat
    template, rotary embedding and identity: what reading its messages takes) and :meth:`client` reaches it."""

    @abstractmethod
    def client(self) -> RemoteSender:
        """A (lazily connecting) client for the served participant."""
