"""Ray Serve deployments: a CPU ingress and a model deployment.

    GuardIngress (FastAPI: uploads, validation, decoding)  --handle-->  GuardModel (one engine)

`build_app(args)` is the Serve application builder named by `import_path` in deploy/serve.yaml,
so the same file runs with `guardrail serve`, `serve run deploy/serve.yaml` and KubeRay. The
model deployment batches across requests with `@serve.batch` into `engine.check_batch`; its
`max_ongoing_requests` / `max_queued_requests` bound the work in flight and queued, and a full
queue reaches the client as 429 with Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from guardrail.errors import GuardrailError
from guardrail.policy import PolicySet
from guardrail.serve.errors import Overloaded, Unavailable
from guardrail.serve.judge import EnginePool, JudgeRequest, ModelInfo, Work, load_engine
from guardrail.serve.settings import ServiceSettings
from guardrail.verdict import Verdict
from guardrail.video import Video

log = logging.getLogger("guardrail.serve")

INGRESS = "GuardIngress"
MODEL = "GuardModel"


@serve.deployment(name=MODEL, max_ongoing_requests=8, max_queued_requests=16,
                  ray_actor_options={"num_cpus": 1, "num_gpus": 0})
class GuardModel:
    """One engine per replica; `ray_actor_options.num_gpus` in the config gives it a GPU."""

    def __init__(self, settings: dict[str, Any]):
        s = ServiceSettings.model_validate(settings)
        self.pool = EnginePool(load_engine(s))
        self._batch.set_max_batch_size(s.batching.max_batch_size)
        self._batch.set_batch_wait_timeout_s(s.batching.batch_wait_timeout_s)

    async def judge(self, item: Work) -> Verdict | GuardrailError:
        """One request: its host work (processor, rope index, layouts) on a thread, beside
        the batch the engine is running, then into the next batch."""
        return await self._batch(await self.pool.ready(item))

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.02)
    async def _batch(self, items: list[Work]) -> list[Verdict | GuardrailError]:
        # NOTE: typed errors come back as values, so one bad video fails only its own request.
        return await asyncio.to_thread(self.pool.run_batch, items)

    async def info(self) -> ModelInfo:
        return self.pool.info()

    async def check_policy(self, policies: PolicySet) -> GuardrailError | None:
        """The error a set's prompt would raise (returned, so it crosses Ray as a value)."""
        try:
            await asyncio.to_thread(self.pool.check_policy, policies)
        except GuardrailError as err:
            return err
        return None

    async def stats(self) -> dict[str, int]:
        """Batches run, videos judged and the largest batch, since the replica started."""
        return {"batches": self.pool.batches, "items": self.pool.items,
                "max_batch": self.pool.max_batch}


class RayJudge:
    """The `Judge` the ingress app uses: calls into the model deployment."""

    def __init__(self, model: DeploymentHandle, retry_after_s: int):
        self.model = model
        self.retry_after_s = retry_after_s
        self._inflight = 0

    async def check(self, video: Video, request: JudgeRequest) -> Verdict:
        self._inflight += 1
        try:
            response = self.model.judge.remote(Work(video, request))
            try:
                out = await response
            except asyncio.CancelledError:  # timeout or client gone: stop the replica's task
                response.cancel()
                raise
        except BackPressureError as err:
            raise Overloaded(f"model queue is full ({err})", self._retry(err)) from None
        except (DeploymentUnavailableError, RayActorError) as err:
            raise Unavailable(f"model replica unavailable ({type(err).__name__})",
                              self.retry_after_s) from None
        finally:
            self._inflight -= 1
        if isinstance(out, GuardrailError):
            raise out
        return out

    async def info(self) -> ModelInfo:
        return await self.model.info.remote()

    async def check_policy(self, policies: PolicySet) -> None:
        err = await self.model.check_policy.remote(policies)
        if err is not None:
            raise err

    def depth(self) -> int:
        return self._inflight

    def _retry(self, err: BackPressureError) -> int:
        return int(err.retry_after_s) if err.retry_after_s else self.retry_after_s


@serve.deployment(name=INGRESS, max_ongoing_requests=64, max_queued_requests=64,
                  backpressure_config={"status_code": 429, "retry_after_s": 1},
                  ray_actor_options={"num_cpus": 1})
@serve.ingress()
class GuardIngress:
    """FastAPI on CPU: uploads, validation and video decoding; the engine is a handle away."""

    def __init__(self, model: DeploymentHandle, settings: dict[str, Any]):
        self.model = model
        self.settings = ServiceSettings.model_validate(settings)

    def __serve_build_asgi_app__(self):
        from guardrail.serve.app import build_app

        judge = RayJudge(self.model, self.settings.load.retry_after_s)
        app, self._moderator = build_app(judge, self.settings)
        return app

    async def drain(self, timeout_s: float) -> int:
        """Shutting down: refuse new requests (503), wait for the in-flight ones. Returns how
        many were still running at the deadline."""
        return await self._moderator.drain(timeout_s)


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """Serve application builder: `args` are `ServiceSettings` (validated here, so a bad config
    fails before anything deploys)."""
    settings = ServiceSettings.model_validate(args or {})
    settings.check_auth()
    data = settings.model_dump(mode="json")
    return GuardIngress.bind(GuardModel.bind(data), data)
