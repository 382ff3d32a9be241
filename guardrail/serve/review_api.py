"""The review console: its API (`/v1/reviews...`) and its page (`/review`).

The page is one static HTML file (`review.html`, no build step) that talks to the API. API keys
apply to both: an API client sends `Authorization: Bearer <key>`; a browser signs in once on the
page, which sets an HttpOnly, SameSite=Strict cookie holding the key (accepted by these routes
only, so no other route can be driven from a browser session).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
from collections.abc import Callable
from importlib import resources
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse

from guardrail.serve.errors import BadRequest, Forbidden, NotFound, Unauthorized, Unprocessable
from guardrail.serve.inputs import require_json
from guardrail.serve.jobs import Job
from guardrail.serve.reviews import Item, ReviewStore
from guardrail.serve.reviews import Query as ReviewQuery
from guardrail.serve.schemas import (
    ReviewDecision,
    ReviewDetail,
    ReviewFacets,
    ReviewFrame,
    ReviewList,
    ReviewPost,
    ReviewStatus,
    ReviewSummary,
)

COOKIE = "guardrail_key"
COOKIE_PATHS = ("/review", "/v1/reviews")        # the key travels to the review routes only
NDJSON = "application/x-ndjson"
CATEGORY = r"^[A-Za-z0-9_-]{1,32}$"              # a policy category id


def review_api(reviews: ReviewStore, auth: Callable) -> APIRouter:
    api = APIRouter(prefix="/v1/reviews", dependencies=[Depends(auth)])

    def query(request: Request, status: ReviewStatus | None, flagged: bool | None,
              category: str | None, policy_set: str | None) -> ReviewQuery:
        caller = request.state.caller
        return ReviewQuery(status=status, flagged=flagged, category=category,
                           policy_set=policy_set, tenant=None if caller.admin else caller.key)

    @api.get("", response_model=ReviewList)
    async def list_reviews(
            request: Request, status: ReviewStatus | None = None, flagged: bool | None = None,
            category: str | None = Query(None, pattern=CATEGORY),
            policy_set: str | None = Query(None, max_length=200),
            limit: int = Query(50, ge=1, le=500),
            cursor: str | None = Query(None, max_length=500)) -> ReviewList:
        q = query(request, status, flagged, category, policy_set)
        try:
            items, nxt = await asyncio.to_thread(reviews.list, q, limit, cursor)
        except ValueError as err:
            raise BadRequest(f"cursor: {err}") from None
        return ReviewList(items=[_summary(i) for i in items], next=nxt)

    @api.get("/facets", response_model=ReviewFacets)
    async def facets(request: Request) -> ReviewFacets:
        caller = request.state.caller
        sets, cats = await asyncio.to_thread(reviews.facets,
                                             None if caller.admin else caller.key)
        return ReviewFacets(policy_sets=sets, categories=cats)

    @api.get("/export", response_class=Response,
             responses={200: {"description": "One line per reviewed item: the verdict plus "
                              "video_path (the item id) and labels (the reviewer's); the "
                              "predictions format of guardrail bench.",
                              "content": {NDJSON: {"schema": {"type": "string"}}}}})
    async def export(request: Request, flagged: bool | None = None,
                     category: str | None = Query(None, pattern=CATEGORY),
                     policy_set: str | None = Query(None, max_length=200)) -> Response:
        q = query(request, "reviewed", flagged, category, policy_set)
        items = await asyncio.to_thread(reviews.reviewed, q)
        lines = [json.dumps({**i.verdict, "video_path": i.id, "labels": i.review.labels},
                            ensure_ascii=False) + "\n" for i in items if i.review]
        return Response("".join(lines), media_type=NDJSON, headers={
            "Content-Disposition": 'attachment; filename="reviews.jsonl"'})

    async def readable(request: Request, item_id: str) -> Item:
        item = await asyncio.to_thread(reviews.get, item_id)
        if item is None or not request.state.caller.may_read(item.tenant):
            raise NotFound(f"no review item {item_id!r}")
        return item

    @api.get("/{item_id}", response_model=ReviewDetail)
    async def get_review(item_id: str, request: Request) -> ReviewDetail:
        item = await readable(request, item_id)
        return _detail(item, await asyncio.to_thread(reviews.history, item.id))

    @api.get("/{item_id}/frames/{k}", response_class=Response, responses={
        200: {"description": "The thumbnail", "content": {"image/jpeg": {}}}})
    async def frame(item_id: str, request: Request,
                    k: int = Path(ge=0, le=1_000_000)) -> Response:
        item = await readable(request, item_id)
        jpeg = await asyncio.to_thread(reviews.frame, item.id, k)
        if jpeg is None:
            raise NotFound(f"review item {item_id!r} has no frame {k}")
        return Response(jpeg, media_type="image/jpeg",     # users' pictures: never cached
                        headers={"Cache-Control": "no-store"})

    @api.post("/{item_id}", response_model=ReviewDetail, dependencies=[Depends(require_json)])
    async def decide(item_id: str, body: ReviewPost, request: Request) -> ReviewDetail:
        item = await readable(request, item_id)
        known = [c["id"] for c in item.verdict["categories"]]
        unknown = [label for label in body.labels if label not in known]
        if unknown:
            raise Unprocessable(f"unknown category ids {unknown}; this item's policy set "
                                f"{item.policy_set!r} has {known}")
        labels = [c for c in known if c in body.labels]          # the set's order, no repeats
        decided = await asyncio.to_thread(reviews.decide, item.id, labels, body.note,
                                          request.state.caller.key)
        if decided is None:
            raise NotFound(f"no review item {item_id!r}")
        return _detail(decided, await asyncio.to_thread(reviews.history, item.id))

    return api


def review_page(keys: frozenset[str], auth: Callable) -> APIRouter:
    """`/review` (the console), `/review/login` and `/review/logout`."""
    router = APIRouter(prefix="/review", include_in_schema=False)
    page = resources.files("guardrail.serve").joinpath("review.html").read_text("utf-8")
    page = page.replace("{{SIGN_OUT}}", "true" if keys else "false")
    headers = _headers(page)
    sign_in = _login()

    @router.get("", response_class=HTMLResponse)
    async def console(request: Request) -> Response:
        try:
            await auth(request)
        except Unauthorized:
            return HTMLResponse(sign_in, status_code=401, headers=_headers(sign_in))
        return HTMLResponse(page, headers=headers)

    @router.post("/login")
    async def login(request: Request) -> Response:
        _same_origin(request)
        body = (await request.body())[:4096].decode("utf-8", "replace")
        key = (parse_qs(body).get("key") or [""])[0].strip()
        if not any(hmac.compare_digest(key.encode(), k.encode()) for k in keys):
            text = _login("That key is not accepted.")
            return HTMLResponse(text, status_code=401, headers=_headers(text))
        reply = RedirectResponse("/review", status_code=303)
        secure = (request.url.scheme == "https"
                  or request.headers.get("x-forwarded-proto", "").lower() == "https")
        for path in COOKIE_PATHS:
            reply.set_cookie(COOKIE, key, httponly=True, samesite="strict", path=path,
                             secure=secure)
        return reply

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        _same_origin(request)
        reply = RedirectResponse("/review", status_code=303)
        for path in COOKIE_PATHS:
            reply.delete_cookie(COOKIE, path=path)
        return reply

    return router


def _same_origin(request: Request) -> None:
    """Sign-in and sign-out only from the console itself: a form on another site must not
    sign a reviewer out, or into someone else's key. Browsers say where a request comes from
    in `Sec-Fetch-Site`, or at least in `Origin` (never `null`: the pages send their origin);
    a request that says neither is not from a browser page and is refused too."""
    site = request.headers.get("sec-fetch-site")
    origin = request.headers.get("origin")
    host = request.headers.get("host", "")
    from_here = origin is not None and origin.split("://", 1)[-1] == host
    if site is None:
        ok = from_here
    else:
        ok = site in ("same-origin", "none") and (origin is None or from_here)
    if not ok:
        raise Forbidden("sign in and out from the review page itself")


def _headers(page: str) -> dict[str, str]:
    """Security headers of a page: only its own inline scripts run (by hash), nothing frames
    it, nothing caches it."""
    scripts = re.findall(r"<script>(.*?)</script>", page, re.S)
    hashes = " ".join("'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest())
                      .decode() + "'" for s in scripts) or "'none'"
    return {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
            f"style-src 'unsafe-inline'; script-src {hashes}; frame-ancestors 'none'; "
            "form-action 'self'; base-uri 'none'",
            "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
            "Referrer-Policy": "same-origin", "Cache-Control": "no-store"}


def _login(message: str = "") -> str:
    error = f'<p class="err">{message}</p>' if message else ""
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>guardrail review: sign in</title><link rel="icon" href="data:,"><style>
body{{font:15px system-ui,sans-serif;background:#f5f6f8;display:grid;place-items:center;
height:100vh;margin:0}} form{{background:#fff;padding:28px;border-radius:8px;
box-shadow:0 1px 4px #0002;width:320px}} input{{width:100%;padding:8px;margin:8px 0 14px;
box-sizing:border-box}} button{{padding:8px 16px}} .err{{color:#b00020}}</style></head><body>
<form method="post" action="/review/login"><h2>guardrail review</h2>{error}
<label for="key">API key</label><input id="key" name="key" type="password" autofocus
autocomplete="current-password"><button type="submit">Sign in</button></form></body></html>"""


def _summary(item: Item) -> ReviewSummary:
    return ReviewSummary(id=item.id, created_at=Job.iso(item.created_at), status=item.status,
                         flagged=item.flagged, policy_set=item.policy_set, verdict=item.verdict)


def _decision(d) -> ReviewDecision:
    return ReviewDecision(labels=d.labels, note=d.note, reviewer=d.reviewer,
                          reviewed_at=Job.iso(d.reviewed_at))


def _detail(item: Item, history: list) -> ReviewDetail:
    return ReviewDetail(**_summary(item).model_dump(), source=item.source,
                        frames=[ReviewFrame(window=f.window, k=f.k, t_s=f.t_s)
                                for f in item.frames],
                        review=_decision(item.review) if item.review else None,
                        history=[_decision(d) for d in history])
