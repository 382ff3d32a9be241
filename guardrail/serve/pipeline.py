"""One moderation, end to end: options → policy set, source → media → frames → verdict.

Shared by the routes and the job runner. Decoding runs in threads (bounded), the engine behind a
`Judge`; the whole call is bounded in time, and the number of calls in flight is bounded too
(the rest get 429 at once rather than waiting in an unbounded queue).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import contextmanager

from guardrail.errors import VideoTooLargeError
from guardrail.serve.errors import BadRequest, Overloaded, RequestTimeout, Unavailable
from guardrail.serve.inputs import Source, Sources
from guardrail.serve.judge import Cancelled, Judge, JudgeRequest
from guardrail.serve.metrics import Metrics
from guardrail.serve.registry import PolicyRegistry
from guardrail.serve.reviews import ReviewStore, thumbnails
from guardrail.serve.schemas import Options
from guardrail.serve.settings import ServiceSettings
from guardrail.verdict import Verdict
from guardrail.video import Video

log = logging.getLogger("guardrail.serve")


class Moderator:
    def __init__(self, judge: Judge, settings: ServiceSettings, registry: PolicyRegistry,
                 metrics: Metrics, reviews: ReviewStore | None = None):
        self.judge = judge
        self.recorder = Recorder(reviews, settings.review.max_frames, metrics) if reviews else None
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.sources = Sources(settings)
        self.inflight = 0
        self.by_caller: Counter[str | None] = Counter()
        self.draining = False
        self.memory = MemoryBudget(settings.load.decode_memory_bytes, settings.load.retry_after_s)
        self._decoders = asyncio.Semaphore(settings.load.decode_workers)

    @contextmanager
    def admitted(self, caller: str | None = None):
        """A slot for one request, or 429 when `load.max_inflight` are already in, or when
        `caller` (an API key's id) holds `load.max_inflight_per_key` of them (503 while the
        service drains for shutdown)."""
        load = self.settings.load
        if self.draining:
            raise Unavailable("the service is shutting down; retry on another replica",
                              load.retry_after_s)
        if self.inflight >= load.max_inflight:
            raise Overloaded(f"server is busy ({self.inflight} requests in flight)",
                             load.retry_after_s)
        if caller is not None and self.by_caller[caller] >= load.max_inflight_per_key:
            raise Overloaded(f"this key already has {self.by_caller[caller]} requests in "
                             "flight (load.max_inflight_per_key)", load.retry_after_s)
        self.inflight += 1
        self.by_caller[caller] += 1
        try:
            yield
        finally:
            self.inflight -= 1
            self.by_caller[caller] -= 1
            if not self.by_caller[caller]:
                del self.by_caller[caller]

    async def drain(self, timeout_s: float) -> int:
        """Take no new requests; wait for the in-flight ones (up to `timeout_s`). Returns how
        many were still running at the deadline."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.inflight

    def request(self, options: Options) -> JudgeRequest:
        """Validate the options before any decoding (bad policy YAML is a 422 at once)."""
        if options.frames is not None and options.frames > self.settings.limits.max_frames:
            raise BadRequest(f"frames must be at most {self.settings.limits.max_frames}")
        return JudgeRequest(self.registry.resolve(options), options.mode, options.keep_ratio)

    async def moderate(self, source: Source, request: JudgeRequest, frames: int | None = None,
                       timeout_s: float | None = None, *, tenant: str | None = None,
                       job: str | None = None,
                       gone: Callable[[], Awaitable[bool]] | None = None) -> Verdict:
        """Judge one video within `timeout_s` (default: the request timeout); the verdict is
        kept for review as `review.record` says (always for a `job`). At the timeout, or once
        `gone()` says the client has left, the work is cancelled: dropped from the engine's
        queue, or stopped at its next batch boundary."""
        timeout = timeout_s or self.settings.load.request_timeout_s
        work = self._run(source, request, frames)
        try:
            verdict, video = await asyncio.wait_for(
                work if gone is None else _unless_gone(work, gone), timeout)
        except TimeoutError:
            raise RequestTimeout(f"moderation took longer than {timeout:g} s") from None
        if self.recorder is not None and self.settings.review.records(verdict.flagged,
                                                                      job is not None):
            await self.recorder.keep(verdict, video, job or "moderate", tenant,
                                     wait=job is not None)
        return verdict

    async def _run(self, source: Source, request: JudgeRequest, frames: int | None
                   ) -> tuple[Verdict, Video]:
        media = await self.sources.fetch(source)
        t0 = time.perf_counter()
        with self.memory.lease() as lease:       # the frames' bytes, until the verdict
            async with self._decoders:
                video = await asyncio.to_thread(self.sources.decode, media, frames, lease.take)
            decode_ms = (time.perf_counter() - t0) * 1e3
            verdict = await self.judge.check(video, request)
        timing = verdict.timing_ms
        verdict = verdict.model_copy(update={"timing_ms": timing.model_copy(update={
            "decode_video": timing.decode_video + decode_ms, "total": timing.total + decode_ms})})
        self.metrics.observe_verdict(verdict, self.registry.label(verdict.policy_set))
        return verdict, video

    def depths(self) -> dict[str, int]:
        review = self.recorder.pending() if self.recorder else 0
        return {"requests": self.inflight, "engine": self.judge.depth(), "review": review}


GONE_POLL_S = 0.25     # how often a waiting request checks that its client is still there


async def _unless_gone(work: Awaitable, gone: Callable[[], Awaitable[bool]]):
    """`work`'s result, unless the client leaves first: then the work is cancelled and the
    reply (which nobody reads) is Cancelled."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=GONE_POLL_S)
            if done:
                return task.result()
            if await gone():
                log.info("client went away: its moderation is cancelled")
                raise Cancelled("the client went away")
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class MemoryBudget:
    """Bytes of decoded frames this process holds at once. Each moderation takes a `lease`;
    the decoder takes the frames' bytes from it just before decoding them (`take`, from a
    worker thread), and they are given back when the lease ends (the verdict is out). A take
    that would go over the budget is 429 with Retry-After, never an out-of-memory kill."""

    def __init__(self, total: int, retry_after_s: int):
        self.total, self.retry_after_s = total, retry_after_s
        self.used = 0
        self._lock = threading.Lock()

    @contextmanager
    def lease(self):
        lease = _Lease(self)
        try:
            yield lease
        finally:
            lease.close()

    def _take(self, nbytes: int) -> None:
        if nbytes > self.total:
            raise VideoTooLargeError(f"this video's decoded frames take {_mib(nbytes)}, over "
                                     f"the server's whole decode budget of {_mib(self.total)}:"
                                     " ask for fewer frames")
        with self._lock:
            if self.used + nbytes > self.total:
                raise Overloaded(f"decoded frames in memory are at the budget ({_mib(self.used)}"
                                 f" of {_mib(self.total)} in use; this video needs "
                                 f"{_mib(nbytes)})", self.retry_after_s)
            self.used += nbytes

    def _give(self, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"


class _Lease:
    def __init__(self, budget: MemoryBudget):
        self.budget, self.held = budget, 0

    def take(self, nbytes: int) -> None:
        self.budget._take(nbytes)
        self.held += nbytes

    def close(self) -> None:
        self.budget._give(self.held)
        self.held = 0


class Recorder:
    """Keeps verdicts for review, one at a time in arrival order, off the request path: a
    synchronous reply never waits for thumbnails or the database, and a failure to keep one is
    logged and counted, never the request's failure. A job's verdict is awaited (its job ends
    once the verdict is kept, or keeping it failed). At most `max_pending` verdicts wait (each
    holds its video's frames); past that, synchronous verdicts are not kept (counted as
    dropped). Jobs always get in (their number is bounded by the job workers), so a stream of
    synchronous calls cannot starve a job."""

    def __init__(self, reviews: ReviewStore, max_frames: int, metrics: Metrics,
                 max_pending: int = 16):
        self.reviews = reviews
        self.max_frames = max_frames
        self.metrics = metrics
        self.max_pending = max_pending
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._unfinished = 0                  # waiting or being kept right now
        self._closed = False

    def pending(self) -> int:
        return self._unfinished

    async def keep(self, verdict: Verdict, video: Video, source: str, tenant: str | None,
                   wait: bool = False) -> None:
        if self._closed:
            self.metrics.observe_review("dropped")
            return
        if not wait and self._unfinished >= self.max_pending:
            log.warning("review queue full (%d waiting): a verdict was not kept",
                        self._unfinished)
            self.metrics.observe_review("dropped")
            return
        if self._queue is None or self._worker is None or self._worker.done():
            if self._queue is not None:
                self._abandon(self._queue)        # a worker that died: release its waiters
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._work(self._queue))
        done = asyncio.get_running_loop().create_future() if wait else None
        self._queue.put_nowait((verdict, video, source, tenant, done))
        self._unfinished += 1
        if done is not None:
            await done

    async def _work(self, queue: asyncio.Queue) -> None:
        while True:
            verdict, video, source, tenant, done = await queue.get()
            try:
                frames, jpegs = await asyncio.to_thread(thumbnails, video, self.max_frames)
                await asyncio.to_thread(self.reviews.record, verdict, frames, jpegs, source,
                                        tenant)
                self.metrics.observe_review("recorded")
            except asyncio.CancelledError:          # closed while keeping this one
                self.metrics.observe_review("dropped")
                raise
            except Exception:
                log.exception("keeping a verdict for review failed")
                self.metrics.observe_review("failed")
            finally:
                self._finished(done)

    def _finished(self, done: asyncio.Future | None) -> None:
        self._unfinished -= 1
        if done is not None and not done.done():
            done.set_result(None)

    def _abandon(self, queue: asyncio.Queue) -> None:
        """Entries a stopped worker will never keep: counted as dropped, their waiters freed."""
        while not queue.empty():
            *_, done = queue.get_nowait()
            self.metrics.observe_review("dropped")
            self._finished(done)

    async def close(self, timeout_s: float) -> None:
        """Keep what is waiting (up to `timeout_s`), then stop; what is left is dropped."""
        self._closed = True
        if self._queue is None or self._worker is None:
            return
        deadline = time.monotonic() + timeout_s
        while self._unfinished and not self._worker.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._worker.cancel()
        await asyncio.gather(self._worker, return_exceptions=True)
        self._abandon(self._queue)
