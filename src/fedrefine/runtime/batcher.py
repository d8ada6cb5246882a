"""Dynamic batching for a served participant: concurrent requests that fit together share one model call.

A :class:`Batcher` owns the participant's model: one worker thread runs every model call, so the calls never
compete for the CPU threads or the GPU. Each request is a :class:`Job` with a ``key``: jobs with equal keys are
compatible (the caller builds the key so that a merged call gives every job exactly what it would get alone,
e.g. Prefill rows of the same padded width), and a ``None`` key runs alone. The worker takes the oldest job,
waits at most ``max_queue_delay_ms`` (from that job's arrival) for more compatible jobs, takes up to
``max_batch`` of them within ``max_batch_tokens``, runs one call and hands each job its own result.

The queue is bounded: a job past ``max_queue`` waiting is refused at once with :class:`QueueFull`, which
carries how long the queue should take to drain (the server sends it back as a retry hint). Every wait is
bounded: a job's caller waits at most ``wait_s``; a job whose caller has gone (``alive()`` false, or it
stopped waiting) is skipped, never run; :meth:`Batcher.close` fails every pending job and joins the worker.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from fedrefine.runtime.security import logger
from fedrefine.settings import SettingsError, documented

#: Shortest retry hint a full queue sends back (seconds).
MIN_RETRY_AFTER_S = 0.01


@documented
@dataclass
class BatchingConfig:
    """How a served participant batches concurrent Prefill, Hint and Rephrase requests into shared model calls."""

    enabled: bool = field(
        default=True, metadata={"help": "Batch concurrent requests (false: one request per model call, in arrival order)."}
    )
    max_batch: int = field(default=16, metadata={"help": "Most requests merged into one model call."})
    max_batch_tokens: int = field(default=65536, metadata={
        "help": "Most padded tokens (rows x width) in one merged model call; a request larger than this runs alone."})
    max_queue_delay_ms: float = field(default=5.0, metadata={
        "help": "Longest a request waits for others to join its batch (from its arrival); a full batch runs at once."})
    max_queue: int = field(default=64, metadata={
        "help": "Requests waiting for a model call; one more is refused RESOURCE_EXHAUSTED with a retry hint "
                "(trailing metadata grpc-retry-pushback-ms)."})
    max_wait_s: float = field(
        default=120.0, metadata={"help": "Longest a request waits in the queue (or its own deadline, if shorter); "
                                         "then it is answered DEADLINE_EXCEEDED and never run."}
    )

    def __post_init__(self) -> None:
        counts = {"max_batch": self.max_batch, "max_batch_tokens": self.max_batch_tokens, "max_queue": self.max_queue}
        bad = [k for k, v in counts.items() if not isinstance(v, int) or v < 1]
        if not 0 <= self.max_queue_delay_ms <= 10_000:
            bad.append("max_queue_delay_ms (0..10000)")
        if not self.max_wait_s > 0:
            bad.append("max_wait_s (> 0)")
        if bad:
            raise SettingsError(f"Batching settings out of range: {', '.join(bad)}; counts are positive integers.")


class QueueFull(RuntimeError):
    """The queue holds ``max_queue`` jobs; ``retry_after_s``: about when it should have room."""

    def __init__(self, waiting: int, retry_after_s: float) -> None:
        super().__init__(f"the server's queue is full ({waiting} requests wait for the model); "
                         f"retry in {retry_after_s * 1000:.0f} ms")
        self.waiting, self.retry_after_s = waiting, retry_after_s


class BatcherClosed(RuntimeError):
    """The batcher stopped before this job ran."""


@dataclass(eq=False)
class Job:
    """One request: its compatibility key, payload, cost in padded tokens, and whether its caller still waits."""

    key: Hashable | None
    payload: Any
    tokens: int
    alive: Callable[[], bool] = lambda: True
    arrived: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)


#: ``run(key, payloads)`` -> one result per payload, in order.
RunBatch = Callable[[Hashable | None, Sequence[Any]], Sequence[Any]]


class Batcher:
    """A bounded queue of :class:`Job` and the one thread that runs them, merged by key (see the module doc).

    Args:
        run: runs one model call for compatible payloads and returns one result per payload.
        config: the batching settings (``enabled`` false: every job runs alone).
    """

    def __init__(self, run: RunBatch, config: BatchingConfig) -> None:
        self.run, self.config = run, config
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._batch_seconds = 0.0  # running mean of one model call's wall time (for retry hints)
        self.batches = self.jobs_run = 0
        self._worker = threading.Thread(target=self._work, name="fedrefine-batcher", daemon=True)
        self._worker.start()

    # --- callers -----------------------------------------------------------------------------------
    def submit(self, key: Hashable | None, payload: Any, tokens: int, alive: Callable[[], bool] = lambda: True) -> Job:
        """Queue a job; raises :class:`QueueFull` when ``max_queue`` jobs wait, :class:`BatcherClosed` once closed."""
        job = Job(key if self.config.enabled else None, payload, tokens, alive)
        with self._cond:
            if self._closed:
                raise BatcherClosed("the server is stopping")
            if len(self._queue) >= self.config.max_queue:
                raise QueueFull(len(self._queue), self._retry_after_s())
            self._queue.append(job)
            self._cond.notify_all()
        return job

    def result(self, job: Job, timeout_s: float | None = None) -> Any:
        """The job's result, waiting at most ``timeout_s`` (and ``max_wait_s``); raises TimeoutError past it (the
        job is then withdrawn, never run) and re-raises what its model call raised."""
        wait = self.config.max_wait_s if timeout_s is None else min(timeout_s, self.config.max_wait_s)
        try:
            return job.future.result(timeout=max(0.0, wait))
        except FutureTimeout:
            job.future.cancel()  # the worker skips a cancelled job (a running one finishes; its result is dropped)
            with self._cond:
                if job in self._queue:
                    self._queue.remove(job)
            raise TimeoutError(f"not run within {wait:.1f} s") from None

    def waiting(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop taking jobs, fail every queued one with :class:`BatcherClosed`, and join the worker (bounded)."""
        with self._cond:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in pending:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(BatcherClosed("the server stopped before this request ran"))
        self._worker.join(timeout_s)

    def _retry_after_s(self) -> float:
        """About how long the queue takes to drain (lock held)."""
        calls = len(self._queue) / self.config.max_batch + 1
        return max(MIN_RETRY_AFTER_S, calls * self._batch_seconds, self.config.max_queue_delay_ms / 1000)

    # --- the worker ----------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> list[Job] | None:
        """The oldest job and up to ``max_batch - 1`` younger compatible ones, after waiting at most the delay."""
        config = self.config
        with self._cond:
            while True:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return None
                head = self._queue[0]
                if head.key is not None:
                    until = head.arrived + config.max_queue_delay_ms / 1000
                    while not self._closed and head in self._queue and self._compatible(head) < config.max_batch:
                        left = until - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                if self._closed:
                    return None
                if head in self._queue:  # else its caller gave up while it waited: start again
                    break
            batch, tokens = [head], head.tokens
            if head.key is not None:
                for job in list(self._queue)[1:]:
                    if len(batch) >= config.max_batch:
                        break
                    if job.key == head.key and tokens + job.tokens <= config.max_batch_tokens:
                        batch.append(job)
                        tokens += job.tokens
            for job in batch:
                self._queue.remove(job)
            return batch

    def _compatible(self, head: Job) -> int:
        return sum(job.key == head.key for job in self._queue)

    def _run(self, batch: list[Job]) -> None:
        live = [job for job in batch if job.future.set_running_or_notify_cancel()]
        gone = [job for job in live if not job.alive()]
        for job in gone:  # its client left while it waited: not run
            job.future.set_exception(BatcherClosed("the client left before this request ran"))
        live = [job for job in live if job not in gone]
        if not live:
            return
        start = time.perf_counter()
        try:
            results = self.run(live[0].key, [job.payload for job in live])
            if len(results) != len(live):
                raise RuntimeError(f"a batched call returned {len(results)} results for {len(live)} requests")
        except Exception as err:  # noqa: BLE001 - handed to every caller of the batch, which answers INTERNAL
            logger.exception("A batched model call of %d requests failed", len(live))
            for job in live:
                job.future.set_exception(err)
            return
        seconds = time.perf_counter() - start
        self._batch_seconds = seconds if not self.batches else 0.8 * self._batch_seconds + 0.2 * seconds
        self.batches += 1
        self.jobs_run += len(live)
        for job, result in zip(live, results):
            job.future.set_result(result)
