"""Request → media → decoded video. Everything a client sends is checked here, before any work.

A request names its video in one of four ways: a multipart upload, base64 in JSON, a `data:` URL,
or a reference (an http(s) URL or a server path). References are refused unless an allow-list
in the settings names them: the server never reads arbitrary paths or fetches arbitrary URLs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import re
import tempfile
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import unquote, urlsplit

import httpx
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from guardrail.errors import UsageError, VideoTooLargeError
from guardrail.policy import MAX_POLICY_BYTES
from guardrail.serve.allow import check_path, parse_url
from guardrail.serve.errors import (
    BadRequest,
    Forbidden,
    InvalidJSON,
    StoreUnavailable,
    Unprocessable,
    UnsupportedMediaType,
)
from guardrail.serve.schemas import Options
from guardrail.serve.settings import ServiceSettings
from guardrail.video import Video, image_as_video, load_video

Kind = Literal["video", "image"]
S = TypeVar("S", bound=BaseModel)

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?),", re.S)


@dataclass(frozen=True)
class Media:
    """A video (or image) to judge: bytes in memory, an allow-listed server file, or (`upload`)
    a multipart upload streamed to a temporary file this request owns."""

    kind: Kind
    data: bytes | None = None
    path: str | None = None
    upload: bool = False

    def discard(self) -> None:
        """Remove the temporary file of an upload (once the request is done with it)."""
        if self.upload and self.path:
            with suppress(FileNotFoundError):
                os.unlink(self.path)


@dataclass(frozen=True)
class Reference:
    """An allow-listed http(s) URL, fetched only when the video is needed."""

    url: str
    kind: Kind = "video"


Source = Media | Reference


class Sources:
    """Turns what a client sent into a `Source`, and a `Source` into a decoded `Video`."""

    def __init__(self, settings: ServiceSettings):
        self.settings = settings
        self.limits = settings.limits
        # this process's uploads in flight (a folder per process: replicas may share a spool)
        self.upload_dir = settings.jobs.spool() / f"uploads-{os.getpid()}"
        self._paths = [os.path.realpath(p) for p in settings.allow_paths]
        try:
            self._urls = [parse_url(u) for u in settings.allow_urls]
        except BadRequest as err:
            raise UsageError(f"allow_urls: {err}") from None

    def from_base64(self, text: str, field: str = "video_base64") -> Media:
        if len(text) * 3 // 4 > self.limits.max_upload_bytes:
            raise VideoTooLargeError(f"{field} is over the limit of "
                                     f"{self.limits.max_upload_bytes} bytes")
        try:
            return Media("video", base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise BadRequest(f"{field} is not valid base64") from None

    def from_url(self, url: str, kind: Kind = "video") -> Source:
        """A `data:` URL, or a reference an allow-list permits."""
        if url.startswith("data:"):
            return self._data_url(url, kind)
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme in ("http", "https"):
            parsed = parse_url(url)
            if not any(parsed.under(allowed) for allowed in self._urls):
                raise Forbidden("fetching this URL is not allowed (see allow_urls)")
            return Reference(parsed.geturl(), kind)        # fetched as checked
        parts = urlsplit(url)
        if (parts.scheme == "file" and parts.netloc in ("", "localhost")) or (
                not parts.scheme and url.startswith("/")):
            path = check_path(unquote(parts.path) if parts.scheme else url)
            if not any(os.path.commonpath([path, root]) == root for root in self._paths):
                raise Forbidden("reading this server path is not allowed (see allow_paths)")
            return Media(kind, path=path)
        raise BadRequest("a video URL is a data: URL, an http(s) URL or a file:// path")

    def _data_url(self, url: str, kind: Kind) -> Media:
        head = _DATA_URL.match(url[:512])
        if head is None or ";base64" not in head.group("params"):
            raise BadRequest("a data: URL must be base64 (data:video/mp4;base64,...)")
        mime = (head.group("mime") or "").lower()
        if mime.startswith("image/"):
            kind = "image"
        elif mime.startswith("video/"):
            kind = "video"
        elif mime not in ("", "application/octet-stream"):
            raise UnsupportedMediaType(f"data: URL type {mime!r} is not a video or an image")
        media = self.from_base64(url[head.end():], "data: URL")
        return Media(kind, media.data)

    async def fetch(self, source: Source) -> Media:
        """Bytes of an allow-listed URL: bounded in size, no redirects, and within
        `decode_timeout_s` in total (a slow-dripping server cannot hold a worker longer)."""
        if isinstance(source, Media):
            return source
        deadline = self.limits.decode_timeout_s
        try:
            async with asyncio.timeout(deadline):
                return await self._fetch(source)
        except TimeoutError:
            raise Unprocessable(f"fetching the video URL took over {deadline:g} s") from None

    async def _fetch(self, source: Reference) -> Media:
        limit, chunks, size = self.limits.max_upload_bytes, [], 0
        timeout = httpx.Timeout(self.limits.decode_timeout_s)
        try:
            async with httpx.AsyncClient(follow_redirects=False, timeout=timeout) as client, \
                    client.stream("GET", source.url) as reply:
                if reply.status_code != 200:
                    raise Unprocessable(f"could not fetch the video URL: HTTP {reply.status_code}")
                async for chunk in reply.aiter_bytes():
                    size += len(chunk)
                    if size > limit:
                        raise VideoTooLargeError(f"the video URL is over {limit} bytes")
                    chunks.append(chunk)
        except (httpx.HTTPError, httpx.InvalidURL) as err:
            raise Unprocessable(f"could not fetch the video URL ({type(err).__name__})") from None
        return Media(source.kind, b"".join(chunks))

    def decode(self, media: Media, frames: int | None,
               reserve: Callable[[int], None] | None = None) -> Video:
        """Blocking: decode the sampled frames (run it off the event loop). `reserve(nbytes)`
        takes the decoded frames' bytes from a memory budget before they are decoded."""
        limits = self.limits.video_limits()
        if media.kind == "image":
            data = media.data if media.data is not None else _read(media.path, limits.max_bytes)
            video = image_as_video(data, limits)
            if reserve is not None:
                reserve(video.clips[0].frames.nbytes)
            return video
        source = media.data if media.data is not None else media.path
        return load_video(source, self.settings.sampling_config(frames), limits,
                          self.settings.decoder, reserve)


def _read(path: str | None, limit: int) -> bytes:
    assert path is not None, "media without data or path"
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise VideoTooLargeError(f"the file is over the limit of {limit} bytes")
    return data


# --- request bodies ----------------------------------------------------------------------------


async def read_body(request: Request, schema: type[S], sources: Sources) -> tuple[S, Source]:
    """Parse a multipart or JSON request into `schema` (an `Options` subclass) and its video."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return await _read_form(request, schema, sources)
    if ctype == "application/json" or ctype.endswith("+json"):
        body = await request.body()
        try:
            fields = schema.model_validate_json(body)
        except ValidationError as err:
            if any(e["type"] == "json_invalid" for e in err.errors()):
                raise InvalidJSON("request body is not valid JSON") from None
            raise Unprocessable(_messages(err)) from None
        return fields, _json_source(fields, sources)
    raise UnsupportedMediaType("send multipart/form-data (a `file` part) or application/json")


async def _read_form(request: Request, schema: type[S], sources: Sources) -> tuple[S, Source]:
    form = await request.form(max_files=1, max_fields=16, max_part_size=MAX_POLICY_BYTES + 1024)
    upload = form.get("file")
    values = {k: v for k, v in form.items() if k != "file"}
    if any(not isinstance(v, str) for v in values.values()):
        raise BadRequest("only the `file` part may be a file")
    try:
        fields = schema.model_validate(values)
    except ValidationError as err:
        raise Unprocessable(_messages(err)) from None
    if upload is None or isinstance(upload, str):
        if getattr(fields, "video_url", None):
            return fields, _json_source(fields, sources)
        raise BadRequest("multipart request without a `file` part")
    limit = sources.limits.max_upload_bytes
    if upload.size is not None and upload.size > limit:
        raise VideoTooLargeError(f"upload is {upload.size} bytes, over the limit of {limit}")
    kind: Kind = "image" if (upload.content_type or "").startswith("image/") else "video"
    try:
        path = await asyncio.to_thread(_stream_to_file, upload.file, sources.upload_dir, limit)
    except OSError as err:      # the spool folder: full, read-only, gone
        raise StoreUnavailable(f"cannot save the upload ({err.strerror or err}); "
                               "retry later") from None
    return fields, Media(kind, path=path, upload=True)


def _stream_to_file(src, folder: Path, limit: int) -> str:
    """Copy an upload to a new file in `folder` a megabyte at a time (memory stays flat),
    enforcing `limit` as the bytes arrive."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix="upload-", dir=folder)
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            src.seek(0)
            while chunk := src.read(1 << 20):
                size += len(chunk)
                if size > limit:
                    raise VideoTooLargeError(f"upload is over the limit of {limit} bytes")
                out.write(chunk)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(path)
        raise
    return path


def _json_source(fields: BaseModel, sources: Sources) -> Source:
    b64, url = getattr(fields, "video_base64", None), getattr(fields, "video_url", None)
    if (b64 is None) == (url is None):
        raise BadRequest("give exactly one of video_base64 or video_url")
    return sources.from_base64(b64) if b64 is not None else sources.from_url(url)


def _messages(err: ValidationError) -> str:
    out = []
    for e in err.errors()[:5]:
        loc = ".".join(str(x) for x in e["loc"])
        out.append(f"{loc}: {e['msg']}" if loc else e["msg"])
    return "; ".join(out)


def options_of(fields: BaseModel) -> Options:
    return Options.model_validate(fields.model_dump(include=set(Options.model_fields)))


async def require_json(request: Request) -> None:
    """A route dependency: the body must be JSON (415 otherwise)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise UnsupportedMediaType("send application/json")
