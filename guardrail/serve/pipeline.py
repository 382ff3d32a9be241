"""One moderation, end to end: options → policy set, source → media → frames → verdict.

Shared by the routes and the job runner. Decoding runs in threads (bounded), the engine behind a
`Judge`; the whole call is bounded in time, and the number of calls in flight is bounded too
(the rest get 429 at once rather than waiting in an unbounded queue).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import contextmanager

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
        self.reviews = reviews
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
        if self.reviews is not None and self.settings.review.records(verdict.flagged,
                                                                     job is not None):
            await self._record(verdict, video, job or "moderate", tenant)
        return verdict

    async def _record(self, verdict: Verdict, video: Video, source: str,
                      tenant: str | None) -> None:
        """Keep the verdict and its thumbnails for review. A failure here is logged and
        counted, never the request's failure: the verdict is already decided."""
        assert self.reviews is not None
        try:
            frames, jpegs = await asyncio.to_thread(thumbnails, video,
                                                    self.settings.review.max_frames)
            await asyncio.to_thread(self.reviews.record, verdict, frames, jpegs, source, tenant)
        except Exception:
            log.exception("recording a verdict for review failed")
            self.metrics.observe_review(False)
        else:
            self.metrics.observe_review(True)

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
        return {"requests": self.inflight, "engine": self.judge.depth()}
