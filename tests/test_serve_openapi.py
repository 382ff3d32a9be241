"""The served OpenAPI document is valid, complete and truthful: every schema it references
exists, and every status the service really answers with (tried below) is documented."""

from __future__ import annotations

import base64
import json

import serve_fixtures
from fastapi.testclient import TestClient
from openapi_spec_validator import validate

from guardrail.serve.app import create_app
from guardrail.serve.judge import LocalJudge
from guardrail.serve.settings import Jobs, Limits, Load, ServiceSettings

engine, clip = serve_fixtures.engine, serve_fixtures.clip   # shared fixtures
UNIFORM = serve_fixtures.UNIFORM


def _app(engine, tmp_path, **changes):
    base = dict(host="127.0.0.1", frames=2, sampling=UNIFORM, api_keys=["k"],
                jobs=Jobs(db_path=str(tmp_path / "jobs.sqlite"), workers=0))
    return create_app(LocalJudge(engine), ServiceSettings(**{**base, **changes}))


def _refs(node):
    if isinstance(node, dict):
        if "$ref" in node:
            yield node["$ref"]
        for v in node.values():
            yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def test_document_is_valid_and_every_reference_exists(engine, tmp_path):
    spec = _app(engine, tmp_path).openapi()
    validate(spec)
    schemas = spec["components"]["schemas"]
    missing = {r for r in _refs(spec) if r.rsplit("/", 1)[-1] not in schemas}
    assert not missing
    moderate = spec["paths"]["/v1/moderate"]["post"]["requestBody"]["content"]
    assert moderate["application/json"]["schema"]["$ref"].endswith("/ModerateJSON")
    assert "webhook_url" not in schemas["ModerateJSON"]["properties"]
    assert "webhook_url" not in moderate["multipart/form-data"]["schema"]["properties"]
    jobs = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
    assert "webhook_url" in jobs["multipart/form-data"]["schema"]["properties"]
    metrics = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain; version=0.0.4"]


def test_every_status_the_service_answers_is_documented(engine, tmp_path, clip):
    auth = {"authorization": "Bearer k"}
    mp4 = base64.b64encode(clip).decode()
    tries = {  # (method, path, kwargs) -> what the service answered
        ("post", "/v1/moderate", "ok"): {"files": {"file": ("v.mp4", clip, "video/mp4")}},
        ("post", "/v1/moderate", "no key"): {"json": {"video_base64": mp4}, "headers": {}},
        ("post", "/v1/moderate", "bad base64"): {"json": {"video_base64": "!!"}},
        ("post", "/v1/moderate", "bad json"): {"content": b"{", "headers": {
            **auth, "content-type": "application/json"}},
        ("post", "/v1/moderate", "path"): {"json": {"video_url": "/etc/passwd"}},
        ("post", "/v1/moderate", "too big"): {"files": {"file": ("v.mp4", clip * 40,
                                                                  "video/mp4")}},
        ("post", "/v1/moderate", "text"): {"content": b"hi", "headers": {
            **auth, "content-type": "text/plain"}},
        ("post", "/v1/moderate", "bad policy"): {"json": {"video_base64": mp4,
                                                           "policy": "x: 1"}},
        ("post", "/v1/moderate", "frames true"): {"json": {"video_base64": mp4,
                                                            "frames": True}},
        ("post", "/v1/moderations", "text"): {"json": {"input": "hello"}},
        ("post", "/v1/moderations", "bad"): {"json": {"input": [{"type": "nope"}]}},
        ("post", "/v1/jobs", "ok"): {"files": {"file": ("v.mp4", clip, "video/mp4")}},
        ("post", "/v1/jobs", "webhook"): {"files": {"file": ("v.mp4", clip, "video/mp4")},
                                          "data": {"webhook_url": "http://10.0.0.1/"}},
        ("get", "/v1/jobs/{job_id}", "missing"): {"url": "/v1/jobs/job-nope"},
        ("get", "/v1/policies", "no key"): {"headers": {}},
    }
    app = _app(engine, tmp_path, limits=Limits(max_upload_bytes=len(clip) * 4),
               load=Load(max_inflight=4))
    spec = app.openapi()
    seen = {}
    with TestClient(app) as c:
        for (method, path, why), kw in tries.items():
            kw = dict(kw)
            url = kw.pop("url", path)
            kw["headers"] = kw.get("headers", auth)
            reply = c.request(method.upper(), url, **kw)
            seen[(method, path, why)] = reply.status_code
            if reply.status_code >= 400:
                body = reply.json()
                assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}
        seen[("get", "/healthz", "ok")] = c.get("/healthz").status_code
    for (method, path, why), status in seen.items():
        documented = spec["paths"][path][method]["responses"]
        assert str(status) in documented, f"{method} {path} ({why}) answered {status}"
    assert seen[("post", "/v1/moderate", "frames true")] == 422
    assert len({s for s in seen.values()}) >= 7                # the tries really differ
    assert json.dumps(spec).count("ErrorBody") > 10
