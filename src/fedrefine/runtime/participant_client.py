"""A receiver's client for a served participant: connect (with backoff), check its identity, and prefill
or write hints within a deadline; every failure becomes :class:`~fedrefine.wire.SenderUnavailable`. A call the
server refuses for a full queue is sent again after the server's retry hint, a bounded number of times.

Bytes on the wire are counted as the transport carries the reply: each streamed chunk's serialised
size plus gRPC's 5-byte message prefix (HTTP/2 frame headers and TLS records are not counted).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TypeVar

import grpc
from torch import Tensor

from fedrefine.participants import Participant, ParticipantIdentity
from fedrefine.participants.generation import Reply
from fedrefine.participants.sources import ParticipantSource
from fedrefine.runtime.admission import RETRY_AFTER_KEY
from fedrefine.runtime.identities import identity_from_json
from fedrefine.runtime.protos import participant_pb2 as pb
from fedrefine.runtime.protos import participant_pb2_grpc as pb_grpc
from fedrefine.runtime.security import ClientSecurity, logger, split_endpoint
from fedrefine.settings import SettingsError, documented
from fedrefine.wire.format import MAX_MESSAGE_BYTES, MessageRequest, WireFormatError, deserialize_message
from fedrefine.wire.remote import Delivery, HintDelivery, RemoteSender, RemoteSource, SenderUnavailable

T = TypeVar("T")
#: gRPC's length-prefixed message framing: 1 byte compressed flag + 4 bytes length, per message.
GRPC_MESSAGE_PREFIX = 5
_REASONS = {
    grpc.StatusCode.DEADLINE_EXCEEDED: "deadline",
    grpc.StatusCode.UNAVAILABLE: "unreachable",
    grpc.StatusCode.UNAUTHENTICATED: "refused",
    grpc.StatusCode.PERMISSION_DENIED: "refused",
    grpc.StatusCode.INVALID_ARGUMENT: "refused",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "refused",
}


@documented
@dataclass
class CallSettings:
    """How long a receiver waits for a served participant, and how it (re)connects."""

    deadline_s: float = field(
        default=30.0, metadata={"help": "Each call's deadline; a sender slower than that is left out of the query."}
    )
    connect_timeout_s: float = field(default=5.0, metadata={"help": "How long one connection attempt may take."})
    connect_retries: int = field(
        default=3, metadata={"help": "Attempts to set up the connection (the backoff doubles from 0.5 s between them)."}
    )
    retry_after_s: float = field(
        default=30.0,
        metadata={"help": "After a failed set-up, calls fail at once for this long before the next attempt (a sender "
                          "that is down costs one set-up per interval, not one per query)."},
    )
    busy_retries: int = field(
        default=2,
        metadata={"help": "Times a call the server refused for a full queue (RESOURCE_EXHAUSTED with a retry hint) is "
                          "sent again after the hinted wait, within the call's deadline; 0: never."},
    )

    def __post_init__(self) -> None:
        if min(self.deadline_s, self.connect_timeout_s) <= 0 or self.connect_retries < 1 or self.retry_after_s < 0 \
                or self.busy_retries < 0:
            raise SettingsError(f"Call settings must be positive (at least one connection attempt), got {self}.")


class ParticipantClient(RemoteSender):
    """Calls one served participant.

    Args:
        endpoint: ``grpc://host:port`` or ``grpcs://host:port`` (TLS).
        expected: the identity its fusers were trained for; a server reporting another is refused.
        security: token and TLS material.
        calls: deadlines and connection attempts.
    """

    def __init__(
        self,
        endpoint: str,
        expected: ParticipantIdentity,
        security: ClientSecurity | None = None,
        calls: CallSettings | None = None,
    ) -> None:
        self.endpoint, self.expected = endpoint, expected
        self.calls = calls or CallSettings()
        self._down: tuple[float, SenderUnavailable] | None = None  # (until when, why) after a failed set-up
        self.target, self.tls = split_endpoint(endpoint)
        self.security = security or ClientSecurity()
        self._metadata = self.security.metadata()
        self._channel: grpc.Channel | None = None
        self._stub: pb_grpc.ParticipantStub | None = None
        self._identity_error: SenderUnavailable | None = None
        self._lock = threading.Lock()

    # --- connection ------------------------------------------------------------------------------
    def _options(self) -> list[tuple[str, object]]:
        return [("grpc.max_receive_message_length", 8 << 20), ("grpc.enable_retries", 0)]

    def connect(self) -> pb_grpc.ParticipantStub:
        """The stub, connecting first if needed: bounded attempts with backoff, then the identity check."""
        with self._lock:
            if self._identity_error is not None:
                raise self._identity_error
            if self._stub is not None:
                return self._stub
            if self._down is not None and time.monotonic() < self._down[0]:
                raise self._down[1]
            delay, last = 0.5, None
            for attempt in range(self.calls.connect_retries):
                channel = self.security.channel(self.target, self.tls, self._options())
                try:
                    grpc.channel_ready_future(channel).result(timeout=self.calls.connect_timeout_s)
                    reply = pb_grpc.ParticipantStub(channel).Identity(
                        pb.IdentityRequest(), timeout=self.calls.deadline_s, metadata=self._metadata
                    )
                except (grpc.FutureTimeoutError, grpc.RpcError) as err:
                    channel.close()
                    last = err
                    if isinstance(err, grpc.RpcError) and err.code() in (
                        grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED
                    ):
                        raise self._unavailable(err) from None  # credentials do not improve with retries
                    if attempt + 1 < self.calls.connect_retries:
                        time.sleep(delay)
                        delay *= 2
                    continue
                self._check_identity(reply)
                self._channel, self._stub = channel, pb_grpc.ParticipantStub(channel)
                return self._stub
            detail = "no answer" if isinstance(last, grpc.FutureTimeoutError) else _detail(last)
            down = SenderUnavailable(
                self.endpoint, "unreachable",
                f"{detail} after {self.calls.connect_retries} connection attempts of {self.calls.connect_timeout_s:g} s "
                f"(next attempt in {self.calls.retry_after_s:g} s)",
            )
            self._down = (time.monotonic() + self.calls.retry_after_s, down)
            raise down

    def _check_identity(self, reply: pb.IdentityReply) -> None:
        try:
            served = identity_from_json(reply.identity_json, "served")
        except ValueError as err:
            raise SenderUnavailable(self.endpoint, "invalid_message", str(err)) from None
        if served != self.expected:
            self._identity_error = SenderUnavailable(
                self.endpoint, "identity",
                f"serves {served.key}, but the fuser of this link was trained for {self.expected.key}; refused",
            )
            logger.error("%s", self._identity_error)
            raise self._identity_error

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
            self._channel = self._stub = None

    def _unavailable(self, err: grpc.RpcError) -> SenderUnavailable:
        return SenderUnavailable(self.endpoint, _REASONS.get(err.code(), "error"), _detail(err))

    def _call(self, call: Callable[[float], T]) -> T:
        """``call(timeout)``, sent again after the server's retry hint while it refuses for a full queue (at most
        :attr:`CallSettings.busy_retries` times, never past the deadline); any other failure ends it at once."""
        deadline, retries = time.monotonic() + self.calls.deadline_s, self.calls.busy_retries
        while True:
            try:
                return call(max(deadline - time.monotonic(), 1e-3))
            except grpc.RpcError as err:
                wait = retry_hint_s(err)
                if wait is None or retries == 0 or time.monotonic() + wait >= deadline:
                    raise self._unavailable(err) from None
                retries -= 1
                logger.info("%s: queue full, calling again in %.3f s", self.endpoint, wait)
                time.sleep(wait)

    # --- calls -----------------------------------------------------------------------------------
    def prefill(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        layers: Sequence[int],
        sent: Tensor | None,
        codec: str,
        group_size: int,
        trained_for: Sequence[str],
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> Delivery:
        stub = self.connect()
        mask = attention_mask.cpu().bool()  # (B, N)
        request = pb.PrefillRequest(
            prompts=[pb.TokenRow(ids=row[keep].tolist()) for row, keep in zip(input_ids.cpu(), mask)],
            layers=list(layers),
            codec=codec,
            group_size=group_size,
            width=input_ids.shape[1],
        )
        if sent is not None:
            request.sent.extend(pb.TokenRow(ids=row.nonzero().flatten().tolist()) for row in sent.cpu())
        def receive(timeout: float) -> tuple[list[bytes], int, float, int]:  # each attempt starts afresh
            parts, total, sender_seconds, carried = [], 0, 0.0, 0
            for chunk in stub.Prefill(request, timeout=timeout, metadata=self._metadata):
                carried += chunk.ByteSize() + GRPC_MESSAGE_PREFIX
                total = total or chunk.total_bytes
                if max(total, sum(map(len, parts)) + len(chunk.data)) > max_message_bytes:
                    raise SenderUnavailable(
                        self.endpoint, "invalid_message",
                        f"message of {max(total, carried):,} bytes is over the limit of {max_message_bytes:,}; refused",
                    )
                parts.append(chunk.data)
                sender_seconds = chunk.prefill_seconds + chunk.encode_seconds or sender_seconds
            return parts, total, sender_seconds, carried

        start = time.perf_counter()
        parts, total, sender_seconds, carried = self._call(receive)
        seconds = time.perf_counter() - start
        data = b"".join(parts)
        if len(data) != total:
            raise SenderUnavailable(self.endpoint, "invalid_message", f"got {len(data):,} of the {total:,} bytes announced")
        request = MessageRequest.of(layers, attention_mask, sent)
        try:
            message = deserialize_message(data, self.expected, trained_for, max_message_bytes, input_ids.device, request)
        except WireFormatError as err:
            raise SenderUnavailable(self.endpoint, err.reason, str(err)) from None
        if message.attention_mask.shape != attention_mask.shape or not (message.attention_mask.cpu() == mask).all():
            raise SenderUnavailable(self.endpoint, "invalid_message", "the message's positions are not the prompts sent")
        return Delivery(message, seconds, sender_seconds, carried)

    def hints(self, prompts: Sequence[str], max_new_tokens: int, batch_size: int) -> HintDelivery:
        stub = self.connect()
        request = pb.HintRequest(prompts=list(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size)
        start = time.perf_counter()
        reply = self._call(lambda timeout: stub.Hint(request, timeout=timeout, metadata=self._metadata))
        seconds = time.perf_counter() - start
        if len(reply.replies) != len(prompts):
            raise SenderUnavailable(self.endpoint, "invalid_message", f"{len(reply.replies)} hints for {len(prompts)} prompts")
        replies = [Reply(r.text, tuple(r.token_ids), r.seconds) for r in reply.replies]
        return HintDelivery(replies, seconds, reply.ByteSize() + GRPC_MESSAGE_PREFIX)

    def rephrase(self, queries: Sequence[str], variant: str | None = None) -> list[pb.Rephrasing]:
        """The served participant's rephrasings of ``queries`` (it must offer rephrasing)."""
        stub = self.connect()
        request = pb.RephraseRequest(queries=list(queries), variant=variant or "")
        reply = self._call(lambda timeout: stub.Rephrase(request, timeout=timeout, metadata=self._metadata))
        return list(reply.rephrasings)


#: The longest server retry hint a call waits for (a longer one ends the call: the sender is left out).
MAX_RETRY_HINT_S = 5.0


def retry_hint_s(err: grpc.RpcError, longest: float = MAX_RETRY_HINT_S) -> float | None:
    """The seconds a RESOURCE_EXHAUSTED refusal asks to wait before calling again (its ``grpc-retry-pushback-ms``
    trailing metadata), or None: another failure, no hint, or a hint that is not a number from 0 to ``longest``
    (a server's metadata is not trusted)."""
    if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    try:
        hint = dict(err.trailing_metadata() or ()).get(RETRY_AFTER_KEY)
        seconds = int(hint) / 1000 if isinstance(hint, str) and hint.isdigit() and len(hint) <= 9 else None
    except (TypeError, ValueError):
        return None
    return seconds if seconds is not None and seconds <= longest else None


def _detail(err: BaseException | None) -> str:
    if isinstance(err, grpc.RpcError):
        return f"{err.code().name}: {err.details()}"
    return str(err)


class RemoteParticipant(RemoteSource):
    """A sender served by ``fedrefine serve participant`` at ``endpoint``.

    Args:
        endpoint: ``grpc://host:port`` or ``grpcs://host:port``.
        reader: the same participant's source, loaded here only to read its messages and tokenize for it
            (tokenizer, chat template, rotary embedding, identity). For a toy participant that is the
            whole tiny model.
        security: token and TLS material.
        calls: deadlines and connection attempts.
    """

    def __init__(
        self,
        endpoint: str,
        reader: ParticipantSource,
        security: ClientSecurity | None = None,
        calls: CallSettings | None = None,
    ) -> None:
        split_endpoint(endpoint)  # a malformed endpoint fails at config time
        self.endpoint, self.reader, self.security = endpoint, reader, security
        self.calls = calls or CallSettings()
        self._view: Participant | None = None

    def describe(self) -> dict[str, object]:
        return {
            "class_path": f"{type(self).__module__}.{type(self).__qualname__}",
            "init_args": {
                "endpoint": self.endpoint,
                "reader": self.reader.describe(),
                "security": None if self.security is None else asdict(self.security),
                "calls": asdict(self.calls),
            },
        }

    def load(self) -> Participant:
        if self._view is None:
            self._view = self.reader.load()
        return self._view

    def client(self) -> ParticipantClient:
        return ParticipantClient(self.endpoint, self.load().identity, self.security, self.calls)
