"""The engine behind the service: decoded videos in, verdicts (or typed errors) out.

`EnginePool` wraps one loaded `GuardEngine` and runs batches of work on it, one batch at a time,
with per-request policy sets and settings. `LocalJudge` drives a pool in-process (tests, dev,
`serve(backend="local")`); the Ray model deployment drives one pool per replica
(`deployment.py`). Both implement `Judge`, which is all the HTTP app sees.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Protocol

from guardrail.engine import GuardEngine, Prepared
from guardrail.errors import GuardrailError
from guardrail.policy import PolicySet
from guardrail.serve.errors import Overloaded
from guardrail.serve.registry import PolicyRegistry
from guardrail.serve.settings import ServiceSettings
from guardrail.verdict import Verdict
from guardrail.video import Video

log = logging.getLogger("guardrail.serve")
PREPARE_THREADS = 2        # per engine pool: requests prepared at once ahead of the engine


@dataclass(frozen=True)
class JudgeRequest:
    """What to judge against; None fields mean "as the engine is configured"."""

    policies: PolicySet | None = None
    mode: str | None = None
    keep_ratio: float | None = None

    def key(self) -> tuple:
        return (self.policies.fingerprint() if self.policies else None, self.mode,
                self.keep_ratio)


@dataclass(frozen=True)
class Work:
    video: Video
    request: JudgeRequest
    prepared: Prepared | None = None    # the engine's host work, done before its turn


@dataclass(frozen=True)
class ModelInfo:
    model: str
    policy_set: str


class InternalError(GuardrailError):
    """An unexpected failure while judging one video (logged with its traceback)."""


class Cancelled(GuardrailError):
    """The caller stopped waiting (timed out, or its client went away): the work was dropped
    at the next batch boundary. Nobody reads this reply; it is logged and counted."""

    http_status, kind = 499, "cancelled"


def _stop_at(stop: threading.Event | None):
    """A `progress` callback for check_batch that drops the work at the next forward batch or
    explain batch once `stop` is set."""
    def progress(*_) -> None:
        if stop is not None and stop.is_set():
            raise Cancelled("the caller stopped waiting")
    return progress


Outcome = Verdict | GuardrailError


class Judge(Protocol):
    """What the HTTP app needs from the engine side."""

    async def check(self, video: Video, request: JudgeRequest) -> Verdict:
        """Judge one decoded video; raises typed errors (429 when full)."""
        ...

    async def info(self) -> ModelInfo:
        """The model and default policy set; raises when the engine is not up."""
        ...

    async def check_policy(self, policies: PolicySet) -> None:
        """Raise PromptTooLongError when the set's prompt cannot fit the model's context."""
        ...

    def depth(self) -> int:
        """Requests waiting for or inside the engine, as seen from here."""
        ...


class EnginePool:
    """One loaded engine, variants of it per request settings (LRU), one batch at a time."""

    def __init__(self, engine: GuardEngine, max_variants: int = 16):
        self.engine = engine
        self.max_variants = max_variants
        self._variants: OrderedDict[tuple, GuardEngine] = OrderedDict()
        self._lock = threading.Lock()  # GuardEngine is not thread-safe: one batch at a time
        self._variants_lock = threading.Lock()   # the LRU, also used by `prepared`
        # preparing has threads of its own: a burst of arrivals must not hold up run_batch in
        # asyncio's shared default pool
        self._preparing = ThreadPoolExecutor(PREPARE_THREADS,
                                             thread_name_prefix="guardrail-prepare")
        self.batches = 0
        self.items = 0
        self.max_batch = 0

    def info(self) -> ModelInfo:
        return ModelInfo(self.engine.adapter.name, self.engine.policies.name)

    def check_policy(self, policies: PolicySet) -> None:
        """Tokenizes the set's prompt (no tensors); PromptTooLongError when it cannot fit."""
        with self._lock:
            self.engine.with_policies(policies)

    def variant(self, req: JudgeRequest) -> GuardEngine:
        with self._variants_lock:
            return self._variant(req)

    def _variant(self, req: JudgeRequest) -> GuardEngine:
        key = req.key()
        if key in self._variants:
            self._variants.move_to_end(key)
            return self._variants[key]
        engine = self.engine.with_policies(req.policies) if req.policies else self.engine
        changes = _config_changes(engine, req)
        if changes:
            engine = engine.with_config(**changes)
        self._variants[key] = engine
        while len(self._variants) > self.max_variants:
            self._variants.popitem(last=False)
        return engine

    def prepared(self, item: Work) -> Work:
        """`item` with its video prepared for its engine variant (processor, rope index,
        layouts; `GuardEngine.prepare`). Outside the engine's lock: requests waiting for their
        turn get this done while another batch is on the device. Where preparing fails the
        item goes on unprepared, and judging it reports the error as it always did."""
        try:
            return replace(item, prepared=self.variant(item.request).prepare([item.video]))
        except GuardrailError:
            return item
        except Exception:
            log.warning("preparing a video failed; judging it unprepared", exc_info=True)
            return item

    async def ready(self, item: Work) -> Work:
        """`prepared` on the pool's own preparing threads."""
        return await asyncio.get_running_loop().run_in_executor(self._preparing,
                                                                self.prepared, item)

    def run_batch(self, items: list[Work], stop: threading.Event | None = None
                  ) -> list[Outcome]:
        """Blocking. Items with the same settings go through `check_batch` together; one bad
        video fails only itself. Once `stop` is set, what is left is dropped (Cancelled) at
        the next batch boundary, so the next caller does not wait for abandoned work."""
        with self._lock:
            self.batches, self.items = self.batches + 1, self.items + len(items)
            self.max_batch = max(self.max_batch, len(items))
            out: list[Outcome | None] = [None] * len(items)
            groups: dict[tuple, list[int]] = {}
            for i, item in enumerate(items):
                groups.setdefault(item.request.key(), []).append(i)
            for idx in groups.values():
                group = [items[i] for i in idx]
                for i, res in zip(idx, self._run_group(group[0].request, group, stop),
                                  strict=True):
                    out[i] = res
            return out  # type: ignore[return-value]

    def _run_group(self, req: JudgeRequest, items: list[Work],
                   stop: threading.Event | None = None) -> list[Outcome]:
        if stop is not None and stop.is_set():
            return [Cancelled("the caller stopped waiting")] * len(items)
        try:
            engine = self.variant(req)
        except GuardrailError as err:  # the request's settings: every video of the group fails
            return [err] * len(items)
        if len(items) > 1:
            try:
                return list(engine.check_batch(_inputs(items), progress=_stop_at(stop)))
            except Cancelled as err:
                return [err] * len(items)
            except Exception as err:  # one bad video fails only itself: judge them one by one
                if not isinstance(err, GuardrailError):
                    log.exception("a batch failed; judging its videos one by one")
        return [self._one(engine, item, stop) for item in items]

    @staticmethod
    def _one(engine: GuardEngine, item: Work, stop: threading.Event | None = None
             ) -> Outcome:
        try:
            return engine.check_batch(_inputs([item]), progress=_stop_at(stop))[0]
        except GuardrailError as err:
            return err
        except Exception as err:
            log.exception("judging a video failed")
            return InternalError(f"judging failed ({type(err).__name__})")


def _inputs(items: list[Work]) -> Prepared | list[Video]:
    """What `check_batch` takes for `items`: their prepared group when every one is."""
    if all(item.prepared is not None for item in items):
        return Prepared.merge([item.prepared for item in items])
    return [item.video for item in items]


def _config_changes(engine: GuardEngine, req: JudgeRequest) -> dict:
    changes: dict = {}
    if req.mode is not None and req.mode != engine.config.mode:
        changes["mode"] = req.mode
    if req.keep_ratio is not None and req.keep_ratio != engine.config.keep_ratio:
        changes["keep_ratio"] = req.keep_ratio
    return changes


def load_engine(settings: ServiceSettings) -> GuardEngine:
    """The engine a replica serves with: the model, and the registry's default policy set."""
    from guardrail.console import quiet_transformers

    quiet_transformers()          # no weight-loading bar in a replica's log
    registry = PolicyRegistry(settings.policies_dir, settings.policy_set)
    return GuardEngine.from_pretrained(
        settings.model, policies=registry.get(settings.policy_set), device=settings.device,
        dtype=settings.dtype, attn=settings.attn, layout=settings.layout, mode=settings.mode,
        max_new_tokens=settings.max_new_tokens, keep_ratio=settings.keep_ratio,
        pruning_mode=settings.pruning_mode, batch_size=settings.batch_size,
        sampling=settings.sampling_config(), limits=settings.limits.video_limits(),
        decoder=settings.decoder, engine=settings.engine, vllm=settings.vllm or None,
        max_prompt_tokens=settings.limits.max_prompt_tokens)


class LocalJudge:
    """An `EnginePool` in this process: one request in the engine at a time, `max_queued`
    waiting, the rest refused with 429 (never unbounded queueing)."""

    def __init__(self, engine: GuardEngine, max_queued: int = 16, retry_after_s: int = 1):
        self.pool = EnginePool(engine)
        self.max_queued = max_queued
        self.retry_after_s = retry_after_s
        self._pending = 0
        self._turn = asyncio.Lock()

    async def check(self, video: Video, request: JudgeRequest) -> Verdict:
        if self._pending > self.max_queued:
            raise Overloaded(f"engine queue is full ({self._pending} waiting)",
                             self.retry_after_s)
        self._pending += 1
        stop = threading.Event()
        try:
            # the host work first, beside whatever the engine is running now
            work = await self.pool.ready(Work(video, request))
            async with self._turn:    # cancelled while waiting: dropped from the queue
                (out,) = await asyncio.to_thread(self.pool.run_batch, [work], stop)
        except asyncio.CancelledError:  # timed out or the client left: drop the running work
            stop.set()
            raise
        finally:
            self._pending -= 1
        if isinstance(out, GuardrailError):
            raise out
        return out

    async def info(self) -> ModelInfo:
        return self.pool.info()

    async def check_policy(self, policies: PolicySet) -> None:
        await asyncio.to_thread(self.pool.check_policy, policies)

    def depth(self) -> int:
        return self._pending
