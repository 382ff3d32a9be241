"""Admission before the body: a request is admitted (an in-flight slot, one of its caller's
share of them, `Content-Length` within the limit) before a byte of its body is read, and its
size and pace are enforced while the body streams in (not after it is buffered). A full server
answers 429 at once, however large the upload; a body that trickles in is 408 within seconds."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guardrail.serve.errors import BodyTimeout, PayloadTooLarge, error_response

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
GRACE_S = 5.0       # a body may take this long before its pace is held to the minimum rate


class BodyLimit:
    """Refuse bodies over the route's limit: at once when Content-Length says so, else as soon
    as the streamed bytes pass it (the route's read raises `PayloadTooLarge`, mapped to 413).
    `routes` gives the routes that take more (method, path prefix, bytes: uploads, policy
    YAML); every other route gets `max_bytes`, so a sign-in or a decision cannot make the
    server hold megabytes."""

    def __init__(self, app: ASGIApp, max_bytes: int = SMALL_BODY,
                 routes: tuple[tuple[str, str, int], ...] = (), timeout_s: float = 60.0,
                 min_rate: int = 16384):
        self.app = app
        self.max_bytes = max_bytes
        self.routes = routes
        self.pace = Pace(timeout_s, min_rate)

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
        seen, done = 0, False
        start = time.monotonic()
        expected = int(declared) if declared is not None and declared.isdigit() else None

        async def limited() -> Message:
            nonlocal seen, done
            if done:                             # the body is in: waits for a disconnect
                return await receive()
            try:
                message = await asyncio.wait_for(receive(),
                                                 self.pace.wait(start, seen, expected))
            except TimeoutError:
                raise self.pace.error(seen) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                done = not message.get("more_body", False)
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


class Pace:
    """How long a request body may take: after GRACE_S it must keep up `min_rate` bytes/s on
    average (a body dripped in a byte at a time is cut off within seconds), and it must be in
    within `timeout_s` plus the time its declared length takes at `min_rate`."""

    def __init__(self, timeout_s: float, min_rate: int):
        self.timeout_s, self.min_rate = timeout_s, min_rate

    def wait(self, start: float, seen: int, expected: int | None) -> float:
        """Seconds the next piece of body may take to arrive."""
        end = start + self.timeout_s + ((expected or 0) / self.min_rate if self.min_rate else 0)
        if self.min_rate:
            end = min(end, start + GRACE_S + seen / self.min_rate)
        return max(end - time.monotonic(), 0.001)

    def error(self, seen: int) -> BodyTimeout:
        return BodyTimeout(f"the request body arrived too slowly ({seen} bytes so far; it must "
                           f"keep up {self.min_rate} bytes/s after {GRACE_S:g} s and arrive "
                           f"within {self.timeout_s:g} s plus its length at that rate)")


class Admission:
    """Holds one of `moderator`'s in-flight slots for the whole of each moderation request
    (POST to `paths`), taken before the body is read; 429 with Retry-After when none is free,
    or when the caller (`caller(scope)`: its API key; None: not told apart) already holds its
    share."""

    def __init__(self, app: ASGIApp, moderator, paths: frozenset[str],
                 caller: Callable[[Scope], str | None]):
        self.app, self.moderator, self.paths, self.caller = app, moderator, paths, caller

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or \
                scope.get("path") not in self.paths:
            await self.app(scope, receive, send)
            return
        try:
            slot = self.moderator.admitted(self.caller(scope))
            slot.__enter__()
        except Exception as err:            # Overloaded: answered before the body is read
            await error_response(err)(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            slot.__exit__(None, None, None)
