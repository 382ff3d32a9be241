"""One moderation, end to end: options → policy set, source → media → frames → verdict.

Shared by the routes and the job runner. Decoding runs in threads (bounded), the engine behind a
`Judge`; the whole call is bounded in time, and the number of calls in flight is bounded too
(the rest get 429 at once rather than waiting in an unbounded queue).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import contextmanager, suppress

from guardrail.serve.errors import BadRequest, Overloaded, RequestTimeout, Unavailable
from guardrail.serve.inputs import Source, Sources
from guardrail.serve.judge import Judge, JudgeRequest
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
        self.draining = False
        self._decoders = asyncio.Semaphore(settings.load.decode_workers)

    @contextmanager
    def admitted(self):
        """A slot for one request, or 429 when `load.max_inflight` are already in (503 while
        the service drains for shutdown)."""
        if self.draining:
            raise Unavailable("the service is shutting down; retry on another replica",
                              self.settings.load.retry_after_s)
        if self.inflight >= self.settings.load.max_inflight:
            raise Overloaded(f"server is busy ({self.inflight} requests in flight)",
                             self.settings.load.retry_after_s)
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

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
                       job: str | None = None) -> Verdict:
        """Judge one video within `timeout_s` (default: the request timeout); the verdict is
        kept for review as `review.record` says (always for a `job`)."""
        timeout = timeout_s or self.settings.load.request_timeout_s
        try:
            verdict, video = await asyncio.wait_for(self._run(source, request, frames), timeout)
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
        async with self._decoders:
            video = await asyncio.to_thread(self.sources.decode, media, frames)
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


class Recorder:
    """Keeps verdicts for review, one at a time in arrival order, off the request path: a
    synchronous reply never waits for thumbnails or the database, and a failure to keep one is
    logged and counted, never the request's failure. A job's verdict is awaited (the job is
    not done until it is kept). At most `max_pending` wait (each holds its video's frames);
    past that, synchronous verdicts are not kept (counted as dropped)."""

    def __init__(self, reviews: ReviewStore, max_frames: int, metrics: Metrics,
                 max_pending: int = 16):
        self.reviews = reviews
        self.max_frames = max_frames
        self.metrics = metrics
        self.max_pending = max_pending
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._unfinished = 0                  # waiting or being kept right now

    def pending(self) -> int:
        return self._unfinished

    async def keep(self, verdict: Verdict, video: Video, source: str, tenant: str | None,
                   wait: bool = False) -> None:
        if self._queue is None or self._worker is None or self._worker.done():
            self._queue = asyncio.Queue(self.max_pending)
            self._worker = asyncio.create_task(self._work(self._queue))
        done = asyncio.get_running_loop().create_future() if wait else None
        entry = (verdict, video, source, tenant, done)
        if done is None:
            try:
                self._queue.put_nowait(entry)
            except asyncio.QueueFull:
                log.warning("review queue full (%d waiting): a verdict was not kept",
                            self.max_pending)
                self.metrics.observe_review("dropped")
                return
            self._unfinished += 1
            return
        self._unfinished += 1
        try:
            await self._queue.put(entry)
        except BaseException:
            self._unfinished -= 1
            raise
        await done

    async def _work(self, queue: asyncio.Queue) -> None:
        while True:
            verdict, video, source, tenant, done = await queue.get()
            try:
                frames, jpegs = await asyncio.to_thread(thumbnails, video, self.max_frames)
                await asyncio.to_thread(self.reviews.record, verdict, frames, jpegs, source,
                                        tenant)
                self.metrics.observe_review("recorded")
            except Exception:
                log.exception("keeping a verdict for review failed")
                self.metrics.observe_review("failed")
            finally:
                queue.task_done()
                self._unfinished -= 1
                if done is not None and not done.done():
                    done.set_result(None)

    async def close(self, timeout_s: float) -> None:
        """Keep what is waiting (up to `timeout_s`), then stop."""
        if self._queue is None or self._worker is None:
            return
        with suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout_s)
        self._worker.cancel()
        with suppress(asyncio.CancelledError):
            await self._worker
