"""Wall-clock timing that waits for the accelerator: a stopwatch, and time spent inside given modules."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work on ``device`` (no-op on the CPU), so that a clock reading is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Elapsed:
    """Seconds measured by :func:`stopwatch` (set when its block ends)."""

    seconds: float = 0.0


@contextmanager
def stopwatch(device: torch.device) -> Iterator[Elapsed]:
    """Time the enclosed block on ``device``: synchronized before it starts and after it ends."""
    elapsed = Elapsed()
    synchronize(device)
    start = time.perf_counter()
    try:
        yield elapsed
    finally:
        synchronize(device)
        elapsed.seconds = time.perf_counter() - start


@contextmanager
def time_inside(modules: Sequence[torch.nn.Module], device: torch.device) -> Iterator[Elapsed]:
    """Accumulate the wall time spent inside ``modules``' forward calls while the block runs."""
    spent, started = Elapsed(), {}

    def before(module, args):
        synchronize(device)
        started[id(module)] = time.perf_counter()

    def after(module, args, output):
        synchronize(device)
        spent.seconds += time.perf_counter() - started.pop(id(module))

    handles = [h for m in modules for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        yield spent
    finally:
        for handle in handles:
            handle.remove()
