"""The HTTP API as a FastAPI app over a `Judge`.

    app = create_app(LocalJudge(engine), settings)      # in-process (tests, dev)
    # or, on Ray Serve, the ingress deployment builds it over the model deployment's handle.

Routes validate, await the pipeline and return a schema; errors become JSON in `errors.py`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse

from guardrail.errors import PromptTooLongError
from guardrail.policy import MAX_POLICY_BYTES
from guardrail.serve import webhooks
from guardrail.serve.errors import (
    STORE_RETRY_S,
    BadRequest,
    Forbidden,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    StoreUnavailable,
    Unauthorized,
    Unavailable,
    Unprocessable,
    install_error_handlers,
)
from guardrail.serve.inputs import Media, read_body, require_json
from guardrail.serve.jobs import Job, JobStore
from guardrail.serve.judge import Judge
from guardrail.serve.limits import Admission, BodyLimit
from guardrail.serve.metrics import CONTENT_TYPE, Metrics
from guardrail.serve.openapi import complete
from guardrail.serve.pipeline import Moderator
from guardrail.serve.registry import PolicyRegistry
from guardrail.serve.review_api import COOKIE, review_api, review_page
from guardrail.serve.reviews import ReviewStore
from guardrail.serve.runner import JobRunner, job_request, job_view
from guardrail.serve.schemas import (
    CategoryInfo,
    Health,
    JobCreated,
    JobJSON,
    JobView,
    ModerateJSON,
    ModerationResult,
    ModerationsRequest,
    ModerationsResponse,
    PolicyDetail,
    PolicyList,
    PolicyVersion,
    PolicyVersions,
    TextPart,
)
from guardrail.serve.settings import ServiceSettings
from guardrail.verdict import Verdict

ADMITTED = frozenset({"/v1/moderate", "/v1/moderations", "/v1/jobs"})   # in-flight slots


def create_app(judge: Judge, settings: ServiceSettings | None = None) -> FastAPI:
    """The service over `judge`. Raises `UsageError` for settings it cannot serve with (API keys
    missing on a non-loopback interface, a bad policies directory)."""
    return build_app(judge, settings)[0]


def build_app(judge: Judge, settings: ServiceSettings | None = None
              ) -> tuple[FastAPI, Moderator]:
    """`create_app`, plus the moderator that admits requests (its `drain` shuts the door)."""
    settings = settings or ServiceSettings(host="127.0.0.1")
    settings.check_auth()
    store = JobStore(settings.jobs.url(), settings.jobs.spool())
    registry = PolicyRegistry(settings.policies_dir, settings.policy_set, store)
    reviews = ReviewStore(store.db, settings.review.max_items)
    metrics = Metrics()
    moderator = Moderator(judge, settings, registry, metrics, reviews)
    runner = JobRunner(store, moderator, settings.jobs, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        runner.start()
        try:
            yield
        finally:
            try:
                await runner.stop()
            finally:
                if moderator.recorder is not None:
                    await moderator.recorder.close(settings.load.drain_timeout_s)

    app = FastAPI(title="guardrail", version="1", lifespan=lifespan)
    install_error_handlers(app)
    upload = settings.limits.max_body_bytes
    load = settings.load
    app.add_middleware(BodyLimit, routes=(                        # everything else: 4 KB
        ("POST", "/v1/moderate", upload), ("POST", "/v1/moderations", upload),
        ("POST", "/v1/jobs", upload), ("PUT", "/v1/policies/", MAX_POLICY_BYTES + 4096)),
        timeout_s=load.body_timeout_s, min_rate=load.min_body_rate)
    keys, admins = settings.keys(), settings.admins()
    app.add_middleware(Admission, moderator=moderator, paths=ADMITTED,    # outermost: first
                       caller=_caller_of(keys))
    app.add_middleware(Observe, metrics=metrics)
    review_auth = _auth(keys, admins, cookie=True)
    app.include_router(review_api(reviews, review_auth))                   # before /v1
    app.include_router(_api(moderator, registry, store, runner, settings),
                       dependencies=[Depends(_auth(keys, admins))])
    app.include_router(review_page(keys, review_auth))
    app.include_router(_open(judge, moderator, store, metrics))
    inferred = app.openapi

    def documented() -> dict:
        if not app.openapi_schema:
            app.openapi_schema = complete(inferred())
        return app.openapi_schema

    app.openapi = documented
    return app, moderator


def _api(moderator: Moderator, registry: PolicyRegistry, store: JobStore, runner: JobRunner,
         settings: ServiceSettings) -> APIRouter:
    api = APIRouter(prefix="/v1")
    hook_rules = webhooks.rules(settings.jobs.webhook_allow)

    @api.post("/moderate", response_model=Verdict)
    async def moderate(request: Request) -> Verdict:
        fields, source = await read_body(request, ModerateJSON, moderator.sources)
        try:
            req = moderator.request(fields)
            return await moderator.moderate(source, req, fields.frames,
                                            tenant=request.state.caller.key,
                                            gone=request.is_disconnected)
        finally:
            if isinstance(source, Media):
                source.discard()

    @api.post("/moderations", response_model=ModerationsResponse,
              dependencies=[Depends(require_json)])
    async def moderations(body: ModerationsRequest, request: Request) -> ModerationsResponse:
        parts = [body.input] if isinstance(body.input, str) else body.input
        if not parts or any(isinstance(p, str | TextPart) for p in parts):
            raise BadRequest("only video_url and image_url inputs are judged; text is not")
        if len(parts) > settings.limits.max_inputs:
            raise BadRequest(f"at most {settings.limits.max_inputs} inputs per request")
        sources = [moderator.sources.from_url(p.video_url.url, "video") if p.type == "video_url"
                   else moderator.sources.from_url(p.image_url.url, "image") for p in parts]
        options = body.options()
        req = moderator.request(options)
        tenant = request.state.caller.key
        verdicts = await _all([moderator.moderate(s, req, options.frames, tenant=tenant,
                                                  gone=request.is_disconnected)
                               for s in sources])
        results = [ModerationResult.of(v, s.kind) for v, s in zip(verdicts, sources,
                                                                  strict=True)]
        return ModerationsResponse(id=f"modr-{uuid.uuid4().hex}", model=verdicts[0].model,
                                   results=results)

    @api.post("/jobs", response_model=JobCreated, status_code=202)
    async def create_job(request: Request) -> JobCreated:
        fields, source = await read_body(request, JobJSON, moderator.sources)
        try:
            return await _create_job(request, fields, source)
        finally:
            if isinstance(source, Media):
                source.discard()

    async def _create_job(request: Request, fields: JobJSON, source) -> JobCreated:
        req = moderator.request(fields)
        webhook = None
        if fields.webhook_url is not None:           # checked now, and again at delivery
            url, named = webhooks.check(fields.webhook_url, hook_rules)
            await asyncio.to_thread(webhooks.resolve, url, named)
            webhook = url.geturl()
        queued = (await asyncio.to_thread(store.counts)).get("queued", 0)
        if queued >= settings.jobs.max_queued:
            raise Overloaded(f"{queued} jobs are queued; try later", settings.load.retry_after_s)
        data = source.data if isinstance(source, Media) else None
        upload = source.path if isinstance(source, Media) and source.upload else None
        try:
            job = await asyncio.to_thread(store.create, job_request(req, fields.frames, source),
                                          data, webhook, request.state.caller.key, upload)
        except OSError as err:            # the spool folder: full, read-only, gone
            raise StoreUnavailable(f"cannot save the job's input ({err.strerror or err}); "
                                   "retry later") from None
        runner.notify()
        return JobCreated(id=job.id, status=job.status)

    @api.get("/jobs/{job_id}", response_model=JobView)
    async def get_job(job_id: str, request: Request) -> JobView:
        job = await asyncio.to_thread(store.get, job_id)
        if job is None or not request.state.caller.may_read(job.tenant):
            raise NotFound(f"no job {job_id!r}")       # another key's job does not exist
        return job_view(job)

    @api.get("/policies", response_model=PolicyList)
    async def policies() -> PolicyList:
        return await asyncio.to_thread(registry.listing)

    @api.put("/policies/{name}", response_model=PolicyDetail, status_code=201,
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/yaml": {"schema": {"type": "string"}}}}})
    async def put_policy(name: str, request: Request) -> PolicyDetail:
        caller = request.state.caller
        if settings.keys() and not caller.admin:
            raise Forbidden("registering a policy version needs a key in admin_keys")
        body = await request.body()
        if len(body) > MAX_POLICY_BYTES:
            raise PayloadTooLarge(f"a policy is at most {MAX_POLICY_BYTES} bytes")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("the policy YAML is not UTF-8") from None
        candidate = await asyncio.to_thread(registry.parse, name, text)
        try:
            await moderator.judge.check_policy(candidate)
        except PromptTooLongError as err:          # invalid for this model: 422 here
            raise Unprocessable(str(err)) from None
        pset = await asyncio.to_thread(registry.put, name, text)
        return _detail(pset)

    @api.get("/policies/{name}", response_model=PolicyDetail)
    async def get_policy(name: str) -> PolicyDetail:
        try:
            pset = await asyncio.to_thread(registry.get, name)
        except BadRequest as err:
            raise NotFound(str(err)) from None
        stored = await asyncio.to_thread(store.policy, name, pset.version)
        return _detail(pset, stored["yaml"] if stored else registry.file_text(name))

    @api.get("/policies/{name}/versions", response_model=PolicyVersions)
    async def policy_versions(name: str) -> PolicyVersions:
        rows = await asyncio.to_thread(registry.versions, name)
        return PolicyVersions(name=name, versions=[PolicyVersion(
            version=r["version"], hash=r["hash"],
            created_at=Job.iso(r["created_at"]) if r["created_at"] is not None else None)
            for r in rows])

    return api


def _open(judge: Judge, moderator: Moderator, store: JobStore, metrics: Metrics) -> APIRouter:
    """Routes without API keys: health for probes, metrics for scrapers on the same network."""
    router = APIRouter()

    @router.get("/healthz", response_model=Health, responses={503: {"model": Health}})
    async def healthz() -> Health | JSONResponse:
        """Readiness: the model answers and the job store can be read and written. A store
        fault is 503 `{"status": "degraded", "store": "unavailable"}` (a load balancer sends
        new work elsewhere; requests that reach this replica still get JSON errors or, for
        synchronous moderation, verdicts from the policies it has)."""
        if moderator.draining:                          # load balancers: send no more
            raise Unavailable("the service is shutting down", 1)
        try:
            info = await asyncio.wait_for(judge.info(), 5.0)
        except Exception as err:
            raise Unavailable(f"model is not ready ({type(err).__name__})", 5) from None
        if not await store_answers(store):
            body = Health(status="degraded", model=info.model, policy_set=info.policy_set,
                          store="unavailable")
            return JSONResponse(body.model_dump(), status_code=503,
                                headers={"Retry-After": str(STORE_RETRY_S)})
        return Health(status="ok", model=info.model, policy_set=info.policy_set)

    @router.get("/livez", response_model=Health)
    async def livez() -> Health:
        """Liveness: the process serves HTTP (for a Kubernetes livenessProbe; restarting a
        replica does not mend a stopped database, so the store is not asked)."""
        return Health(status="ok")

    @router.get("/metrics")
    async def prometheus() -> Response:
        metrics.decoded.set(moderator.memory.used)
        try:
            counts = await asyncio.to_thread(store.counts)
        except StoreUnavailable:                    # still scrapeable: the outage shows
            metrics.store_up.set(0)
            metrics.set_depths(moderator.depths())
        else:
            metrics.store_up.set(1)
            metrics.set_depths({**moderator.depths(), "jobs": counts.get("queued", 0)})
            metrics.set_jobs(counts)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return router


async def store_answers(store: JobStore, timeout_s: float = 5.0) -> bool:
    """Whether the job store can be read now and has not failed a write just before."""
    try:
        await asyncio.wait_for(asyncio.to_thread(store.db.ping), timeout_s)
    except (StoreUnavailable, TimeoutError):
        return False
    return True


async def _all(calls: list[Awaitable[Verdict]]) -> list[Verdict]:
    """Run every call; on the first failure cancel the rest and raise that failure."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(c) for c in calls]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [t.result() for t in tasks]


def _detail(pset, yaml_text: str | None = None) -> PolicyDetail:
    return PolicyDetail(name=pset.name, version=pset.version, hash=pset.content_hash,
                        yaml=yaml_text, categories=[
                            CategoryInfo(id=c.id, name=c.name, threshold=pset.threshold_of(c),
                                         severity=c.severity) for c in pset.categories])


def key_id(key: str) -> str:
    """A key's public name (stored with its jobs; the key itself is never stored)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Caller:
    key: str | None          # key id; None when the service runs without keys
    admin: bool

    def may_read(self, tenant: str | None) -> bool:
        return self.key is None or self.admin or tenant == self.key


def _bearer(value: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value, else None."""
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _one_of(token: str | None, keys: frozenset[str]) -> bool:
    return token is not None and any(hmac.compare_digest(token.encode(), k.encode())
                                     for k in keys)


def _auth(keys: frozenset[str], admins: frozenset[str], cookie: bool = False) -> Callable:
    """The API key check: `Authorization: Bearer <key>`, or (`cookie`: the review console's
    routes) the key the console's sign-in stored in its cookie."""
    async def check(request: Request) -> None:
        request.state.caller = Caller(None, True)
        if not keys:
            return
        header = request.headers.get("authorization", "")
        token = _bearer(header)
        if cookie and not header.partition(" ")[0] and request.cookies.get(COOKIE):
            token = request.cookies[COOKIE]
        if not _one_of(token, keys):
            raise Unauthorized("missing or wrong API key (Authorization: Bearer <key>)")
        request.state.caller = Caller(key_id(token), _one_of(token, admins))
    return check


def _caller_of(keys: frozenset[str]) -> Callable[[dict], str | None]:
    """Who a request counts against for in-flight slots, read from its headers before the
    body: a valid API key's id; every request without one shares one bucket ("anonymous").
    A service without keys (loopback only) has no callers to tell apart: None."""
    def caller(scope: dict) -> str | None:
        if not keys:
            return None
        token = _bearer(dict(scope.get("headers", ())).get(b"authorization", b"")
                        .decode("latin-1"))
        return key_id(token) if _one_of(token, keys) else "anonymous"
    return caller


class Observe:
    """Counts and times every request by route and status. Plain ASGI, not Starlette's
    BaseHTTPMiddleware: that one hides a client's disconnect from the routes (its receive
    wrapper cannot answer a zero-timeout poll), and the routes watch for it to cancel work."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, status = time.perf_counter(), 500

        async def sending(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            self.metrics.observe_request(getattr(route, "path", "other"), scope["method"],
                                         status, time.perf_counter() - t0)
