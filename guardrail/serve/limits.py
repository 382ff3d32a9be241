"""Request body size limit, enforced while the body streams in (not after it is buffered)."""

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
