"""Which calls a FedRefine server takes on, and for how long a client may stall one: bounded concurrent calls
(per client and in total), a deadline on every send, and refusals that are short, coded and logged.

A server's worker threads are its scarcest resource: a client that opens a large streamed reply and never
reads it holds one thread per stream. So every call that runs a model or streams (Prefill, Hint, Rephrase,
Download) takes a slot from a :class:`CallGate`; the server runs ``max_calls`` + :data:`RESERVED_WORKERS`
threads, and the reserve serves what never takes a slot (health, Identity, List): those stay answerable
whatever the other clients do. A client is one connection (gRPC's peer address): a party opening many
connections meets the total limit.

A call that first waits for a batched model call (``admit(..., queued=True)``) takes no slot while it waits: it
counts against its client's limit and against ``max_queued`` (calls waiting at once), and takes a slot with
:meth:`CallGate.take_slot` once its result is ready, to reply. So ``max_calls`` bounds the replies in progress
and ``max_queued`` the waiting calls: the server's threads are ``max_calls`` (and as many for evicted calls
unwinding) + ``max_queued`` + :data:`RESERVED_WORKERS`.

A send that its client has not taken within ``send_timeout_s`` is cancelled (the thread returns at
once). When every slot is taken, a new call evicts the call whose send has been stalled longest, if one has
been stalled for at least :data:`EVICT_AFTER_S` (over a client's limit, the longest stalled of its own calls): a
slow reader holds a slot only while no one else needs it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from fedrefine.runtime.security import logger

#: Worker threads beyond the call slots: health, Identity and List always find one.
RESERVED_WORKERS = 4
#: A call whose send has waited this long for its reader may be evicted by a new call when all slots are taken.
EVICT_AFTER_S = 0.5
#: Longest refusal detail sent back (and logged).
MAX_DETAIL_CHARS = 300


#: Trailing metadata key of a retry hint, in milliseconds (the key gRPC's own retry policy reads as server pushback).
RETRY_AFTER_KEY = "grpc-retry-pushback-ms"


def refuse(context: grpc.ServicerContext, code: grpc.StatusCode, detail: str, method: str = "",
           retry_after_s: float | None = None) -> None:
    """Log and abort the call with ``code`` (``INVALID_ARGUMENT``, ``RESOURCE_EXHAUSTED``, ...) and a short detail;
    ``retry_after_s`` is sent as trailing metadata :data:`RETRY_AFTER_KEY` (whole milliseconds)."""
    if retry_after_s is not None:
        context.set_trailing_metadata(((RETRY_AFTER_KEY, str(max(1, round(retry_after_s * 1000)))),))
    if len(detail) > MAX_DETAIL_CHARS:
        detail = detail[: MAX_DETAIL_CHARS - 3] + "..."
    logger.warning("Refused %s from %s: %s %s", method or "a call", context.peer(), code.name, detail)
    context.abort(code, detail)


class RequestError(ValueError):
    """A request the server refuses: ``code`` is the status it answers with (the detail is short)."""

    def __init__(self, detail: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> None:
        super().__init__(detail)
        self.detail, self.code = detail, code


def checked(check, context: grpc.ServicerContext, method: str, *args):
    """``check(*args)``; a :class:`RequestError` it raises is refused with its code (short and logged)."""
    try:
        return check(*args)
    except RequestError as err:
        refuse(context, err.code, err.detail, method)


class _Call:
    """One admitted call: its context, its client, and since when its pending send has waited (None: none)."""

    def __init__(self, context: grpc.ServicerContext, client: str) -> None:
        self.context, self.client = context, client
        self.sending_since: float | None = None
        self.evicted = False
        self.waiting = False  # admitted to wait for a batched model call: holds no slot yet


class CallGate:
    """At most ``max_calls`` calls at once, ``max_per_client`` per connection; sends cancelled after ``send_timeout_s``.

    Args:
        max_calls: calls that run a model or stream, at once, over all clients.
        max_per_client: the same, per client connection (waiting calls included).
        send_timeout_s: how long one streamed chunk may wait for its reader (and a ready call for a slot).
        max_queued: calls admitted to wait for a batched model call, at once (0: none are).
    """

    def __init__(self, max_calls: int, max_per_client: int, send_timeout_s: float, max_queued: int = 0) -> None:
        if max_calls < 1 or max_per_client < 1 or send_timeout_s <= 0 or max_queued < 0:
            raise ValueError(f"Call limits must be positive, got max_calls={max_calls}, max_per_client="
                             f"{max_per_client}, send_timeout_s={send_timeout_s}, max_queued={max_queued}.")
        self.max_calls, self.max_per_client, self.send_timeout_s = max_calls, max_per_client, send_timeout_s
        self.max_queued = max_queued
        self._calls: list[_Call] = []
        self._lock = threading.Condition()  # notified when a call ends
        self._watchdog: threading.Thread | None = None

    @property
    def workers(self) -> int:
        """Threads the server needs: a slot per call, evicted calls unwinding, waiting calls, and the reserve."""
        return 2 * self.max_calls + self.max_queued + RESERVED_WORKERS

    def active(self) -> int:
        with self._lock:
            return sum(not c.evicted for c in self._calls)

    @contextmanager
    def admit(self, context: grpc.ServicerContext, method: str, queued: bool = False) -> Iterator[_Call]:
        """A slot for the call, held while the block runs; a call over the limits is refused RESOURCE_EXHAUSTED.

        ``queued``: the call first waits for a batched model call, holding a waiting place instead of a slot (at
        most ``max_queued``); it takes its slot with :meth:`take_slot`."""
        client = context.peer()
        with self._lock:
            live = [c for c in self._calls if not c.evicted]
            mine = sum(c.client == client for c in live)
            replying = [c for c in live if not c.waiting]
            problem = None
            if mine >= self.max_per_client and not self._evict([c for c in live if c.client == client]):
                problem = f"this client has {mine} calls in progress (at most {self.max_per_client}); retry when one ends"
            elif queued and len(live) - len(replying) >= self.max_queued:
                problem = f"{len(live) - len(replying)} calls wait for the model (at most {self.max_queued}); retry shortly"
            elif not queued and len(replying) >= self.max_calls and not self._evict(replying):
                problem = f"the server is busy with {len(replying)} calls (at most {self.max_calls}); retry shortly"
            call = None if problem else _Call(context, client)
            if call is not None:
                call.waiting = queued
                self._calls.append(call)
        if call is None:
            refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, problem, method,
                   retry_after_s=EVICT_AFTER_S / 10 if queued else None)
        try:
            yield call
        finally:
            with self._lock:
                self._calls.remove(call)
                self._lock.notify_all()

    def take_slot(self, call: _Call, method: str) -> None:
        """Move a waiting ``call`` to a slot: at once when one is free or a stalled call can be evicted, else
        waiting at most ``send_timeout_s`` for one to free; then refused RESOURCE_EXHAUSTED."""
        deadline = time.monotonic() + self.send_timeout_s
        with self._lock:
            while call.waiting and not call.evicted:
                replying = [c for c in self._calls if not c.evicted and not c.waiting]
                if len(replying) < self.max_calls or self._evict(replying):
                    call.waiting = False
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(min(left, EVICT_AFTER_S / 2))  # woken when a call ends; a stall may become evictable
            if not call.waiting:
                return
        refuse(call.context, grpc.StatusCode.RESOURCE_EXHAUSTED,
               f"{self.max_calls} replies are in progress and none ended within {self.send_timeout_s:g} s; retry "
               "shortly", method, retry_after_s=EVICT_AFTER_S)

    def _evict(self, live: list[_Call]) -> bool:
        """Cancel the call stalled longest on a send (at least :data:`EVICT_AFTER_S`); True if one was (lock held)."""
        now = time.monotonic()
        stalled = [c for c in live if c.sending_since is not None and now - c.sending_since >= EVICT_AFTER_S]
        if not stalled:
            return False
        victim = min(stalled, key=lambda c: c.sending_since)
        victim.evicted = True
        logger.warning("Cancelled a call of %s: its reader took nothing for %.1f s while another call waited",
                       victim.client, now - victim.sending_since)
        victim.context.cancel()
        return True

    def stream(self, call: _Call, chunks: Iterator) -> Iterator:
        """``chunks``, each send watched: one its reader does not take within ``send_timeout_s`` cancels the call."""
        for chunk in chunks:
            with self._lock:
                call.sending_since = time.monotonic()
                self._start_watchdog()
            yield chunk  # returns here once gRPC has handed the chunk to the transport (or the call ended)
            with self._lock:
                call.sending_since = None
            if call.evicted or not call.context.is_active():
                return

    def _start_watchdog(self) -> None:
        """One thread while any send is pending (lock held); it ends when none is."""
        if self._watchdog is None or not self._watchdog.is_alive():
            self._watchdog = threading.Thread(target=self._watch, name="fedrefine-send-deadline", daemon=True)
            self._watchdog.start()

    def _watch(self) -> None:
        while True:
            time.sleep(min(0.1, self.send_timeout_s / 4))
            now = time.monotonic()
            with self._lock:
                pending = [c for c in self._calls if c.sending_since is not None]
                late = [c for c in pending if not c.evicted and now - c.sending_since > self.send_timeout_s]
                for call in late:
                    call.evicted = True
                if not pending:
                    self._watchdog = None
                    return
            for call in late:
                logger.warning("Cancelled a call of %s: its reader took nothing for %.1f s (send_timeout_s)",
                               call.client, self.send_timeout_s)
                call.context.cancel()
