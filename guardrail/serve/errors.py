"""HTTP errors: the service's own typed errors, and the one place every error becomes a reply.

Every reply that is not a success is `{"error": {"type": ..., "message": ...}}`. Client faults
get a 4xx, a full queue 429 and an unavailable model 503 (both with `Retry-After`); only a bug
gives 500, and the service keeps serving after it.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from guardrail.errors import GuardrailError

log = logging.getLogger("guardrail.serve")


class ServiceError(GuardrailError):
    """An HTTP-level error; `retry_after_s` adds a Retry-After header."""

    def __init__(self, message: str, retry_after_s: int | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BadRequest(ServiceError):
    http_status, kind = 400, "invalid_request"


class InvalidJSON(ServiceError):
    http_status, kind = 400, "invalid_json"


class Unauthorized(ServiceError):
    http_status, kind = 401, "unauthorized"


class Forbidden(ServiceError):
    http_status, kind = 403, "forbidden"


class NotFound(ServiceError):
    http_status, kind = 404, "not_found"


class PayloadTooLarge(ServiceError):
    http_status, kind = 413, "payload_too_large"


class UnsupportedMediaType(ServiceError):
    http_status, kind = 415, "unsupported_media"


class BodyTimeout(ServiceError):
    """The request body did not arrive in time (too slow, or stalled)."""

    http_status, kind = 408, "request_timeout"


class Unprocessable(ServiceError):
    http_status, kind = 422, "invalid_request"


class Conflict(ServiceError):
    http_status, kind = 409, "conflict"


class Overloaded(ServiceError):
    http_status, kind = 429, "overloaded"


class Unavailable(ServiceError):
    http_status, kind = 503, "unavailable"


STORE_RETRY_S = 5     # Retry-After while the job store is unavailable


class StoreUnavailable(Unavailable):
    """The job store (database or spool folder) cannot be read or written right now: stopped,
    unreachable, read-only, full. Retried later; nothing is lost."""

    kind = "store_unavailable"

    def __init__(self, message: str, retry_after_s: int | None = None):
        super().__init__(message, STORE_RETRY_S if retry_after_s is None else retry_after_s)


class RequestTimeout(ServiceError):
    http_status, kind = 504, "timeout"


def error_body(kind: str, message: str) -> dict:
    return {"error": {"type": kind, "message": message}}


def error_response(err: BaseException) -> JSONResponse:
    """The reply for any exception; the mapping lives here and nowhere else."""
    if isinstance(err, GuardrailError):
        status, kind, message = err.http_status, err.kind, str(err)
    elif isinstance(err, RequestValidationError):
        status, kind, message = _validation(err)
    elif isinstance(err, HTTPException):
        status, kind, message = err.status_code, _HTTP_KINDS.get(err.status_code,
                                                                 "http_error"), str(err.detail)
    else:
        log.exception("internal error", exc_info=err)
        status, kind, message = 500, "internal_error", "internal error; see the server log"
    headers = {}
    retry = getattr(err, "retry_after_s", None)
    if retry is not None or status in (429, 503):
        headers["Retry-After"] = str(int(retry if retry is not None else 1))
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if status == 408:                     # the rest of the body is not read: hang up
        headers["Connection"] = "close"
    return JSONResponse(error_body(kind, message), status_code=status, headers=headers)


_HTTP_KINDS = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed",
               413: "payload_too_large", 415: "unsupported_media"}


def _validation(err: RequestValidationError) -> tuple[int, str, str]:
    errors = err.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "invalid_json", "request body is not valid JSON"
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {e.get('msg', 'invalid')}" if loc else str(e.get("msg", "invalid")))
    more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
    return 422, "invalid_request", "; ".join(parts) + more


def install_error_handlers(app: FastAPI) -> None:
    async def handle(_: Request, err: Exception) -> JSONResponse:
        return error_response(err)

    for exc_type in (GuardrailError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(exc_type, handle)
