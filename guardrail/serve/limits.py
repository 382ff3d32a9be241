"""Admission before the body: a request is admitted (an in-flight slot, `Content-Length` within
the limit) before a byte of its body is read, and its size is enforced while the body streams
in (not after it is buffered). A full server answers 429 at once, however large the upload."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guardrail.serve.errors import PayloadTooLarge, error_response

TRIM_AFTER_BYTES = 32 << 20


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def release_memory() -> None:
    """glibc keeps freed small blocks of a large body in its heap: `malloc_trim` returns them,
    so the process's RSS goes back to its baseline after a large request (a no-op elsewhere)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


SMALL_BODY = 4096   # sign-in, review decisions and every other small JSON route


class BodyLimit:
    """Refuse bodies over the route's limit: at once when Content-Length says so, else as soon
    as the streamed bytes pass it (the route's read raises `PayloadTooLarge`, mapped to 413).
    `routes` gives the routes that take more (method, path prefix, bytes: uploads, policy
    YAML); every other route gets `max_bytes`, so a sign-in or a decision cannot make the
    server hold megabytes."""

    def __init__(self, app: ASGIApp, max_bytes: int = SMALL_BODY,
                 routes: tuple[tuple[str, str, int], ...] = ()):
        self.app = app
        self.max_bytes = max_bytes
        self.routes = routes

    def _limit(self, scope: Scope) -> int:
        method, path = scope.get("method", ""), scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):    # an app mounted under a prefix (Serve)
            path = path[len(root):]
        return next((n for m, p, n in self.routes if method == m and path.startswith(p)),
                    self.max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope)
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await error_response(self._error(limit))(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise self._error(limit)
            return message

        try:
            await self.app(scope, limited, send)
        finally:
            if seen >= TRIM_AFTER_BYTES:         # hand the freed heap back to the OS
                await asyncio.to_thread(release_memory)

    @staticmethod
    def _error(limit: int) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body is over the limit of {limit} bytes")


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
