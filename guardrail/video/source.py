"""The input, resolved once (`_Source`: a file or bytes, within `max_bytes`), the clock every
stage checks (`_Deadline`, raising `VideoTimeoutError`), and how library failures become
one-line `VideoError`s."""

from __future__ import annotations

import io
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from guardrail.errors import GuardrailError, UnsupportedVideoError, VideoError, VideoTooLargeError
from guardrail.video.types import VideoLimits, VideoSource, _require


class VideoTimeoutError(VideoError):
    """Probing or decoding took longer than `VideoLimits.timeout_s`."""


@dataclass(frozen=True)
class _Source:
    """The input, resolved once: a file on disk or bytes in memory."""

    path: str | None
    data: bytes | None
    num_bytes: int

    def open(self) -> str | io.BytesIO:
        """What FFmpeg opens: a `file:` URL (so no other protocol is read from a path), or bytes."""
        if self.path is not None:
            return "file:" + os.path.abspath(self.path)
        return io.BytesIO(self.data)


class _Deadline:
    def __init__(self, timeout_s: float):
        self.timeout_s, self._end = timeout_s, time.monotonic() + timeout_s

    def left(self) -> float:
        return max(0.0, self._end - time.monotonic())

    def check(self, doing: str) -> None:
        if time.monotonic() > self._end:
            raise self.expired(doing)

    def expired(self, doing: str) -> VideoTimeoutError:
        return VideoTimeoutError(f"gave up {doing} after {self.timeout_s:g} s (timeout_s)")


def _resolve(source: VideoSource, limits: VideoLimits) -> _Source:
    if isinstance(source, bytes | bytearray | memoryview):
        src = _Source(None, bytes(source), len(source))
    elif isinstance(source, str | os.PathLike):
        path = os.fspath(source)
        try:
            if not os.path.isfile(path):
                raise VideoError("file not found" if not os.path.exists(path)
                                 else "not a regular file")
            src = _Source(path, None, os.path.getsize(path))
        except OSError as err:
            raise VideoError(f"cannot read the file ({_one_line(err)})") from err
    else:
        raise TypeError(f"a video source is a path or bytes, not {type(source).__name__}")
    _require(src.num_bytes > 0, "empty file (0 bytes)", UnsupportedVideoError)
    _require(src.num_bytes <= limits.max_bytes, f"{src.num_bytes} bytes is over the limit of "
             f"{limits.max_bytes} bytes", VideoTooLargeError)
    return src


@contextmanager
def _translate(what: str) -> Iterator[None]:
    """Re-raise anything a decoder library throws as a one-line VideoError."""
    try:
        yield
    except GuardrailError:
        raise
    except Exception as err:  # decoder libraries raise anything from ValueError to RuntimeError
        raise VideoError(f"{what} ({_one_line(err)})") from err


_LOG_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: |\[Errno -?\d+\] ")
_OBJECT_REPR = re.compile(r"'?<[\w.]+ object at 0x[0-9a-fA-F]+>'?")   # e.g. Pillow's BytesIO


def _one_line(err: BaseException) -> str:
    """An exception's message on one line, without decord's log prefixes or file names."""
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    text = _OBJECT_REPR.sub("the input", " ".join(str(text).split()))
    return _LOG_PREFIX.sub("", text)[:200]
