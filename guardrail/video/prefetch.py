"""Decoding ahead of the model: while the engine judges one group of videos, the next groups
are decoded in worker threads, so the device does not wait for the host between calls.

    for group, decoded in prefetch(groups, decode_group, ahead=2):
        engine.check_batch(...)

Threads are enough: decord decodes in a child process it forks per video (the thread only
waits on a pipe), and PyAV/FFmpeg release the GIL while they decode and convert frames. At most
`ahead` groups are decoded and waiting at any time, so memory stays bounded by `ahead` groups
of decoded frames. `waited_s` says how long the consumer waited for input, for benchmarks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from time import perf_counter
from typing import Generic, TypeVar

G = TypeVar("G")
D = TypeVar("D")
_END = object()


@dataclass
class Prefetch(Generic[G, D]):
    """Iterate (group, decode(group)) in order, decoding up to `ahead` groups in advance on
    `workers` threads (`ahead=0`: decode each group when it is asked for, no threads)."""

    groups: Iterable[G]
    decode: Callable[[G], D]
    ahead: int = 2
    workers: int = 2
    waited_s: float = field(default=0.0, init=False)   # consumer's time blocked on decoding

    def __iter__(self) -> Iterator[tuple[G, D]]:
        if self.ahead <= 0:
            for group in self.groups:
                t0 = perf_counter()
                decoded = self.decode(group)
                self.waited_s += perf_counter() - t0
                yield group, decoded
            return
        pending: deque[tuple[G, Future]] = deque()
        source = iter(self.groups)
        with ThreadPoolExecutor(self.workers, thread_name_prefix="guardrail-decode") as pool:
            try:
                for group in source:                     # fill the window
                    pending.append((group, pool.submit(self.decode, group)))
                    if len(pending) >= self.ahead + 1:
                        break
                while pending:
                    group, future = pending.popleft()
                    t0 = perf_counter()
                    decoded = future.result()
                    self.waited_s += perf_counter() - t0
                    nxt = next(source, _END)
                    if nxt is not _END:                  # keep `ahead` groups in flight
                        pending.append((nxt, pool.submit(self.decode, nxt)))
                    yield group, decoded
            finally:                                     # a consumer that stops early
                for _, future in pending:
                    future.cancel()


def prefetch(groups: Iterable[G], decode: Callable[[G], D], ahead: int = 2,
             workers: int = 2) -> Prefetch[G, D]:
    return Prefetch(groups, decode, ahead, workers)
