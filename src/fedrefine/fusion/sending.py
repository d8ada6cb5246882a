"""How a receiver's selected senders deliver their messages: local prefills or calls to remote senders,
through the link's layer budget and codec.

    remote senders: every request at once (a thread each), bounded by the client's deadline
    meanwhile: the caller's own work (e.g. the receiver's prefill) in the calling thread
    local senders: in the calling thread, or each in its own thread with ``concurrent``

Torch releases the GIL inside its kernels, so concurrent prefills overlap; on a CPU they share its
cores (``torch.set_num_threads``), on a GPU its streams.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from fedrefine.fuser import Fuser
from fedrefine.fusion.batch import FusionBatch, SenderBatch
from fedrefine.fusion.strategy import FusionStrategy, ReceiverContext
from fedrefine.participants import Participant
from fedrefine.wire import Delivery, LinkConfig, RemoteSender, SenderUnavailable, budgeted_layers, transmit
from fedrefine.wire.format import MAX_MESSAGE_BYTES, WireFormatError
from fedrefine.wire.message import KVMessage, prefill_message

logger = logging.getLogger("fedrefine.fusion")
T = TypeVar("T")
#: The codec a remote sender's K/V travel in without a link codec: its own dtype, losslessly.
LOSSLESS_CODECS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class SendOutcome:
    """What the selected senders delivered for one batch.

    ``messages``: sender -> its message (senders with every gate closed send none); ``dropped``: sender ->
    why it did not deliver; ``deliveries``: remote sender -> its call's measured time and bytes;
    ``seconds``: wall time of sending; ``own``: the receiver's own prefill when it ran while the senders
    worked (see :meth:`~fedrefine.fusion.receiver.FusedReceiver.send`), for the fusion to start from.
    """

    messages: dict[str, KVMessage] = field(default_factory=dict)
    dropped: dict[str, SenderUnavailable] = field(default_factory=dict)
    deliveries: dict[str, Delivery] = field(default_factory=dict)
    seconds: float = 0.0
    own: ReceiverContext | None = None


class Sending:
    """A receiver's senders as it reaches them; how messages travel (the link) is given with each call.

    Args:
        senders: sender name -> participant (for a remote sender, its local view).
        fusers: sender name -> its fuser (which layers and positions it reads).
        strategy: the receiver's fusion strategy (which positions travel).
        remotes: sender name -> client, for senders served elsewhere.
        concurrent: prefill local senders in threads, beside each other and the caller's own work.
    """

    def __init__(
        self,
        senders: Mapping[str, Participant],
        fusers: Mapping[str, Fuser],
        strategy: FusionStrategy,
        remotes: Mapping[str, RemoteSender] | None = None,
        concurrent: bool = False,
    ) -> None:
        self.senders, self.fusers, self.strategy = dict(senders), dict(fusers), strategy
        self.remotes = dict(remotes or {})
        unknown = sorted(set(self.remotes) - set(self.senders))
        if unknown:
            raise ValueError(f"Remote sender(s) {unknown} are not senders of this receiver ({list(self.senders)}).")
        self.concurrent = concurrent
        self._pool: ThreadPoolExecutor | None = None

    def check(self, link: LinkConfig | None) -> None:
        """Refuse a link this receiver cannot use: a layer budget with concat fusion."""
        if link is not None and link.layer_budget is not None and self.strategy.mode == "concat":
            raise ValueError(
                "link.layer_budget applies to residual fusion: concat fusion needs an entry at every receiver "
                "layer. Unset link.layer_budget or use residual fusers."
            )

    def carried_layers(self, name: str, link: LinkConfig | None) -> list[int]:
        """The sender layers its fuser reads, cut to the link's layer budget."""
        fuser = self.fusers[name]
        needed = fuser.sender_layers_needed()
        if link is not None and link.layer_budget is not None:
            needed = budgeted_layers(needed, fuser.sender_layer_importance(), link.layer_budget)
        return needed

    def _trained_for(self) -> list[str]:
        return sorted({f.sender.key for f in self.fusers.values()})

    def send(self, name: str, batch: SenderBatch, link: LinkConfig | None = None) -> KVMessage | None:
        """One sender's prefill, carrying only the layers (and positions) its fuser reads, through the link's
        layer budget and codec (None: in-process tensors, every layer read); None if every gate is closed. A
        remote sender's failure raises :class:`~fedrefine.wire.SenderUnavailable`."""
        if name in self.remotes:
            delivery = self.deliver(name, batch, link)
            return None if delivery is None else delivery.message
        needed = self.carried_layers(name, link)
        if not needed:
            return None
        sent = self.strategy.sent_positions(batch)
        message = prefill_message(self.senders[name], batch.input_ids, batch.attention_mask, needed, sent)
        codec = None if link is None else link.codec_for(name)
        if codec is None:
            return message
        return transmit(message, codec, link, trained_for=self._trained_for())

    def deliver(self, name: str, batch: SenderBatch, link: LinkConfig | None = None) -> Delivery | None:
        """A remote sender's prefill of ``batch`` over its transport (None if every gate is closed)."""
        needed = self.carried_layers(name, link)
        if not needed:
            return None
        codec = link.codec_for(name) if link is not None else None
        return self.remotes[name].prefill(
            batch.input_ids,
            batch.attention_mask,
            needed,
            self.strategy.sent_positions(batch),
            codec or LOSSLESS_CODECS.get(self.senders[name].model.dtype, "fp32"),
            128 if link is None else link.group_size,
            self._trained_for(),
            MAX_MESSAGE_BYTES if link is None else link.max_message_bytes,
        )

    def send_all(
        self,
        batch: FusionBatch,
        senders: Sequence[str],
        link: LinkConfig | None = None,
        meanwhile: Callable[[], T] | None = None,
    ) -> tuple[SendOutcome, T | None]:
        """Every selected sender's message over ``link``, and the result of ``meanwhile`` run while they work. A
        remote sender that fails in any way, and any sender whose message the wire format refuses (malformed,
        missing layers, non-finite values), is dropped (logged, and named with the reason in the outcome); a
        local sender's other failures are errors."""
        self.check(link)
        for name in senders:
            if name not in batch.senders:
                raise KeyError(f"Sender {name!r} was selected but the batch was not encoded for it.")
        outcome, start = SendOutcome(), time.perf_counter()
        threaded = [n for n in senders if n in self.remotes or self.concurrent]
        calls: dict[str, Future] = {}
        if threaded:
            self._pool = self._pool or ThreadPoolExecutor(len(self.senders), thread_name_prefix="fedrefine-send")
            calls = {n: self._pool.submit(self._one, n, batch.senders[n], link) for n in threaded}
        done = meanwhile() if meanwhile is not None else None
        for name in senders:
            if name not in calls:
                try:
                    message = self.send(name, batch.senders[name], link)
                except WireFormatError as err:
                    outcome.dropped[name] = self._drop(name, SenderUnavailable(name, err.reason, str(err)))
                    continue
                if message is not None:
                    outcome.messages[name] = message
        for name, call in calls.items():
            try:
                sent = call.result()  # bounded: a remote client's connection attempts and deadline end every call
            except Exception as err:  # noqa: BLE001 - no sender's failure may end the receiver's run
                if not isinstance(err, (SenderUnavailable, WireFormatError)) and name not in self.remotes:
                    raise
                outcome.dropped[name] = self._drop(name, as_unavailable(name, err))
                continue
            if isinstance(sent, Delivery):
                outcome.deliveries[name], sent = sent, sent.message
            if sent is not None:
                outcome.messages[name] = sent
        outcome.messages = {n: outcome.messages[n] for n in senders if n in outcome.messages}  # selection order
        outcome.seconds = time.perf_counter() - start
        return outcome, done

    @staticmethod
    def _drop(name: str, err: SenderUnavailable) -> SenderUnavailable:
        logger.warning("%s; answering without it", err)
        return err

    def _one(self, name: str, batch: SenderBatch, link: LinkConfig | None) -> Delivery | KVMessage | None:
        """One sender's work in a pool thread (a sender's prefill never needs gradients: no grad-mode to carry)."""
        return self.deliver(name, batch, link) if name in self.remotes else self.send(name, batch, link)


def as_unavailable(name: str, err: Exception) -> SenderUnavailable:
    """``err`` from sender ``name`` as the reason it is dropped: its own, the wire format's, or ``error``."""
    if isinstance(err, SenderUnavailable):
        return err
    if isinstance(err, WireFormatError):
        return SenderUnavailable(name, err.reason, str(err))
    logger.exception("Sender %s failed unexpectedly", name, exc_info=err)
    return SenderUnavailable(name, "error", f"{type(err).__name__}: {str(err)[:200]}")
