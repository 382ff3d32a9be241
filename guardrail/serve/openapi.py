"""What the served OpenAPI document says beyond what FastAPI infers: the request bodies of the
routes that read their own body (multipart or JSON), every error status a route can answer
with the one error schema, and `/metrics` as Prometheus text. Tested against the real
behaviour (tests/test_serve_openapi.py)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from guardrail.serve.schemas import ErrorBody, JobJSON, ModerateJSON

_WHY = {400: "Malformed request, JSON or reference", 401: "Missing or wrong API key",
        409: "Policy name or version conflict (the version must grow)",
        403: "A server path, URL or webhook that is not allowed", 404: "Not found",
        413: "Over a size, duration, pixel or context limit",
        415: "Not a video or an image", 422: "Invalid policy, options or undecodable video",
        429: "Too many requests in flight (see Retry-After)",
        503: "Model unavailable or shutting down (see Retry-After)",
        504: "Over the per-request timeout"}

# the error statuses of each route (401 only where API keys are configured)
_MODERATE = (400, 401, 403, 413, 415, 422, 429, 503, 504)
ERRORS: dict[tuple[str, str], tuple[int, ...]] = {
    ("post", "/v1/moderate"): _MODERATE,
    ("post", "/v1/moderations"): _MODERATE,
    ("post", "/v1/jobs"): (400, 401, 403, 413, 415, 422, 429),
    ("get", "/v1/jobs/{job_id}"): (401, 404),
    ("get", "/v1/policies"): (401,),
    ("get", "/healthz"): (503,),
    ("put", "/v1/policies/{name}"): (400, 401, 403, 409, 413, 422),
    ("get", "/v1/policies/{name}"): (401, 404),
    ("get", "/v1/policies/{name}/versions"): (401, 404),
    ("get", "/v1/reviews"): (400, 401, 422),
    ("get", "/v1/reviews/export"): (401, 422),
    ("get", "/v1/reviews/facets"): (401,),
    ("get", "/v1/reviews/{item_id}"): (401, 404),
    ("get", "/v1/reviews/{item_id}/frames/{k}"): (401, 404, 422),
    ("post", "/v1/reviews/{item_id}"): (400, 401, 404, 415, 422),
}


def _ref(model: type[BaseModel]) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _multipart(model: type[BaseModel]) -> dict:
    """The form fields of a multipart request: the file plus the model's option fields."""
    fields = {name: {"type": "string", "description": f.description or name}
              for name, f in model.model_fields.items()
              if name not in ("video_base64", "video_url")}
    return {"type": "object", "required": ["file"],
            "properties": {"file": {"type": "string", "format": "binary",
                                    "description": "The video (or a still image)."},
                           **fields}}


def _body(model: type[BaseModel]) -> dict:
    return {"required": True, "content": {
        "multipart/form-data": {"schema": _multipart(model)},
        "application/json": {"schema": _ref(model)}}}


def complete(spec: dict[str, Any]) -> dict[str, Any]:
    """Add bodies, error responses and schemas to FastAPI's document (in place)."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for model in (ModerateJSON, JobJSON, ErrorBody):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    paths = spec["paths"]
    paths["/v1/moderate"]["post"]["requestBody"] = _body(ModerateJSON)
    paths["/v1/jobs"]["post"]["requestBody"] = _body(JobJSON)
    for (method, path), codes in ERRORS.items():
        responses = paths[path][method].setdefault("responses", {})
        responses.pop("422", None)              # FastAPI's own validation shape: not ours
        for code in codes:
            responses[str(code)] = {"description": _WHY[code], "content": {
                "application/json": {"schema": _ref(ErrorBody)}}}
    paths["/metrics"]["get"]["responses"]["200"] = {
        "description": "Prometheus text exposition format",
        "content": {"text/plain; version=0.0.4": {"schema": {"type": "string"}}}}
    for name in ("HTTPValidationError", "ValidationError"):
        if not _used(spec, name):
            schemas.pop(name, None)
    return spec


def _used(spec: dict, name: str) -> bool:
    import json

    return f'"#/components/schemas/{name}"' in json.dumps(spec["paths"])
