"""The job runner: claims jobs from the store, judges them, records results, sends webhooks.

Runs as background tasks of the app (one set per ingress replica). Stopping hands running jobs
back to the queue; a runner that dies without stopping loses its lease and the job is claimed
again after `jobs.lease_s`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import uuid
from contextlib import suppress

import httpx

from guardrail.errors import GuardrailError
from guardrail.policy import PolicySet
from guardrail.serve import webhooks
from guardrail.serve.errors import BadRequest, Forbidden, Overloaded, Unavailable
from guardrail.serve.inputs import Media, Reference, Source, Sources
from guardrail.serve.jobs import Job, JobStore
from guardrail.serve.judge import JudgeRequest
from guardrail.serve.metrics import Metrics
from guardrail.serve.pipeline import Moderator
from guardrail.serve.schemas import ErrorInfo, JobView
from guardrail.serve.settings import Jobs

log = logging.getLogger("guardrail.serve")
WEBHOOK_SECRET_ENV = "GUARDRAIL_WEBHOOK_SECRET"


def job_request(request: JudgeRequest, frames: int | None, source: Source) -> dict:
    """What the store keeps to run the job later: the resolved policy set, not its name."""
    if isinstance(source, Reference):
        src = {"kind": source.kind, "url": source.url}
    elif source.path is not None and not source.upload:
        src = {"kind": source.kind, "path": source.path}
    else:
        src = {"kind": source.kind, "spooled": True}
    return {"policies": request.policies.model_dump(mode="json") if request.policies else None,
            "mode": request.mode, "keep_ratio": request.keep_ratio, "frames": frames,
            "source": src}


def job_view(job: Job) -> JobView:
    return JobView(id=job.id, status=job.status, verdict=job.verdict,
                   error=ErrorInfo(**job.error) if job.error else None,
                   created_at=Job.iso(job.created_at), updated_at=Job.iso(job.updated_at))


class JobRunner:
    def __init__(self, store: JobStore, moderator: Moderator, settings: Jobs, metrics: Metrics):
        self.store = store
        self.moderator = moderator
        self.settings = settings
        self.metrics = metrics
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._hook_rules = webhooks.rules(settings.webhook_allow)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work()) for _ in range(self.settings.workers)]
        self._tasks.append(asyncio.create_task(self._deliver()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with suppress(asyncio.CancelledError):
                await task

    def notify(self) -> None:
        """A job was just submitted: look now rather than at the next poll."""
        self._wake.set()

    async def _idle(self) -> None:
        with suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self.settings.poll_s)
        self._wake.clear()

    # --- jobs ---------------------------------------------------------------------------------

    async def _work(self) -> None:
        s = self.settings
        while True:
            try:
                job = await asyncio.to_thread(self.store.claim, self.owner, s.lease_s,
                                              s.max_attempts)
                if job is None:
                    await self._idle()
                else:
                    await self._run(job)
            except Exception:  # the store failed (disk full, locked): keep the runner alive
                log.exception("job runner error")
                await asyncio.sleep(s.poll_s)

    async def _run(self, job: Job) -> None:
        renew = asyncio.create_task(self._renew(job.id))
        verdict = error = None
        try:
            request, frames, source = await asyncio.to_thread(self._decode_request, job)
            result = await self.moderator.moderate(source, request, frames, self.settings.timeout_s,
                                                   tenant=job.tenant, job=job.id)
            verdict = result.model_dump(mode="json")
        except asyncio.CancelledError:
            await asyncio.to_thread(self.store.release, job.id, self.owner)
            raise
        except (Overloaded, Unavailable) as err:  # not the job's fault: try again later
            await asyncio.to_thread(self.store.release, job.id, self.owner)
            await asyncio.sleep(err.retry_after_s or 1)
            return
        except GuardrailError as err:
            error = {"type": err.kind, "message": str(err)}
        except Exception as err:
            log.exception("job %s failed", job.id)
            error = {"type": "internal_error", "message": f"job failed ({type(err).__name__})"}
        finally:
            renew.cancel()
        await asyncio.to_thread(self.store.finish, job.id, self.owner, verdict, error)
        self._wake.set()  # a webhook may be due now

    def _decode_request(self, job: Job) -> tuple[JudgeRequest, int | None, Source]:
        r = job.request
        policies = PolicySet.model_validate(r["policies"]) if r["policies"] else None
        src = r["source"]
        sources: Sources = self.moderator.sources
        if src.get("spooled"):
            source: Source = Media(src["kind"], path=self.store.input_file(job))
        else:  # the allow-lists are checked again: they may have changed since
            source = sources.from_url(src.get("url") or src["path"], src["kind"])
        return JudgeRequest(policies, r["mode"], r["keep_ratio"]), r["frames"], source

    async def _renew(self, job_id: str) -> None:
        while True:
            await asyncio.sleep(self.settings.lease_s / 3)
            if not await asyncio.to_thread(self.store.renew, job_id, self.owner,
                                           self.settings.lease_s):
                return

    # --- webhooks -----------------------------------------------------------------------------

    async def _deliver(self) -> None:
        s = self.settings
        async with httpx.AsyncClient(timeout=s.webhook_timeout_s, follow_redirects=False) as http:
            while True:
                try:
                    job = await asyncio.to_thread(self.store.claim_webhook,
                                                  s.webhook_timeout_s + 5)
                    if job is None:
                        await self._idle()
                        continue
                    state, retry_in = await self._post(http, job)
                    self.metrics.webhooks.labels(state).inc()
                    await asyncio.to_thread(self.store.webhook_result, job.id, state, retry_in)
                except Exception:
                    log.exception("webhook delivery error")
                    await asyncio.sleep(s.poll_s)

    async def _post(self, http: httpx.AsyncClient, job: Job) -> tuple[str, float]:
        """One delivery: (`delivered` | `failed` | `pending`, seconds until the next try)."""
        s = self.settings
        body = job_view(job).model_dump_json().encode()
        headers = {"content-type": "application/json", "user-agent": "guardrail-webhook/1",
                   "x-guardrail-job": job.id,
                   "x-guardrail-delivery-attempt": str(job.webhook_attempts)}
        secret = os.environ.get(WEBHOOK_SECRET_ENV)
        if secret:
            digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
            headers["x-guardrail-signature"] = f"sha256={digest}"
        try:   # checked again here: DNS may point elsewhere now than at creation
            url, named = webhooks.check(job.webhook_url, self._hook_rules)
            target = await asyncio.to_thread(webhooks.resolve, url, named)
            reply = await http.post(target.connect_url(), content=body,
                                    headers={**headers, **target.headers()},
                                    extensions=target.extensions())
            if reply.is_success:
                return "delivered", 0.0
            permanent = 400 <= reply.status_code < 500 and reply.status_code not in (408, 429)
            why = f"HTTP {reply.status_code}"
        except (BadRequest, Forbidden, httpx.InvalidURL, httpx.UnsupportedProtocol) as err:
            permanent, why = True, str(err) or type(err).__name__     # never deliverable
        except httpx.HTTPError as err:
            permanent, why = False, type(err).__name__
        except Exception as err:          # anything else still counts as an attempt
            log.warning("webhook for %s: %s", job.id, type(err).__name__)
            permanent, why = False, type(err).__name__
        if permanent or job.webhook_attempts >= s.webhook_attempts:
            log.warning("webhook for %s failed for good (%s)", job.id, why)
            return "failed", 0.0
        delay = min(s.webhook_max_backoff_s, s.webhook_backoff_s * 2 ** (job.webhook_attempts - 1))
        return "pending", delay
