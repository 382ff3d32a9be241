"""Admission before the body: a request is admitted (an in-flight slot, `Content-Length` within
the limit) before a byte of its body is read, and its size is enforced while the body streams
in (not after it is buffered). A full server answers 429 at once, however large the upload."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guardrail.serve.errors import PayloadTooLarge, error_response


class BodyLimit:
    """Refuse bodies over `max_bytes`: at once when Content-Length says so, else as soon as the
    streamed bytes pass the limit (the route's read raises `PayloadTooLarge`, mapped to 413)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(self._error())(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._error()
            return message

        await self.app(scope, limited, send)

    def _error(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body is over the limit of {self.max_bytes} bytes")


class Admission:
    """Holds one of `moderator`'s in-flight slots for the whole of each moderation request
    (POST to `paths`), taken before the body is read; 429 with Retry-After when none is free."""

    def __init__(self, app: ASGIApp, moderator, paths: frozenset[str]):
        self.app, self.moderator, self.paths = app, moderator, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or \
                scope.get("path") not in self.paths:
            await self.app(scope, receive, send)
            return
        try:
            slot = self.moderator.admitted()
            slot.__enter__()
        except Exception as err:            # Overloaded: answered before the body is read
            await error_response(err)(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            slot.__exit__(None, None, None)
