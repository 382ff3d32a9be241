"""Video input: probe a file or bytes, plan sampling windows, decode the sampled frames.

    probe(source) -> VideoInfo --plan_windows(info, sampling)--> Window... --load_video--> Video

PyAV validates every input first (container opens, has a video stream, sane size, one frame
decodes); only then does the chosen decoder (decord, else PyAV) see it. Every failure is a
`VideoError` subclass with a one-line message, raised within `VideoLimits.timeout_s`.
"""

from __future__ import annotations

import faulthandler
import importlib.util
import io
import math
import multiprocessing
import os
import re
import time
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import ClassVar, Protocol

import av
import numpy as np
from PIL import Image

from guardrail.errors import (
    GuardrailError,
    UnsupportedVideoError,
    UsageError,
    VideoError,
    VideoTooLargeError,
)

VideoSource = str | os.PathLike | bytes

_MAX_FPS = 1000.0  # a stream rate above this is a broken header, not a video
_MAX_BAD_PACKETS = 64  # undecodable packets in a row before a file counts as corrupt
_MAX_WINDOWS = 100_000
# Demuxers that read other files or URLs named inside the input, and still images.
_REFUSED_FORMATS = frozenset({"hls", "dash", "concat", "image2", "sdp", "rtsp", "rtp", "tee"})


def _require(ok: bool, message: str, error: type[Exception] = UsageError) -> None:
    if not ok:
        raise error(message)


class VideoTimeoutError(VideoError):
    """Probing or decoding took longer than `VideoLimits.timeout_s`."""


@dataclass(frozen=True)
class VideoLimits:
    max_bytes: int = 1 << 30  # 1 GiB, checked before anything is decoded
    max_duration_s: float = 4 * 3600
    max_pixels: int = 8192 * 8192  # per frame, width * height
    max_frames: int = 10_000_000  # frame count sanity cap
    timeout_s: float = 60.0  # wall-clock bound on probing + decoding one video

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_duration_s", "max_pixels", "max_frames", "timeout_s"):
            _require(getattr(self, name) > 0, f"video limit {name} must be positive")


@dataclass(frozen=True)
class SamplingConfig:
    """Which frames the model sees. Both modes take the middle frame of n equal segments of a
    window; `uniform` fixes n, `fps` derives it from the window length (capped at max_frames)."""

    mode: str = "uniform"  # "uniform" | "fps"
    num_frames: int = 8  # uniform: exactly this many per window (indices repeat if too few)
    fps: float = 1.0  # fps mode: frames per second of video ...
    max_frames: int = 32  # ... at most this many per window, and never more than it has
    window_s: float | None = None  # window length; None = the whole video is one window
    stride_s: float | None = None  # window start-to-start distance; None = window_s

    def __post_init__(self) -> None:
        _require(self.mode in ("uniform", "fps"), f"sampling mode must be 'uniform' or 'fps', "
                 f"not {self.mode!r}")
        _require(isinstance(self.num_frames, int) and self.num_frames >= 1,
                 "sampling num_frames must be a whole number, at least 1")
        _require(math.isfinite(self.fps) and self.fps > 0, "sampling fps must be positive")
        _require(isinstance(self.max_frames, int) and self.max_frames >= 1,
                 "sampling max_frames must be a whole number, at least 1")
        for name in ("window_s", "stride_s"):
            value = getattr(self, name)
            _require(value is None or (math.isfinite(value) and value > 0),
                     f"sampling {name} must be a positive number of seconds")
        _require(self.stride_s is None or self.window_s is not None,
                 "sampling stride_s needs window_s")


@dataclass(frozen=True)
class VideoInfo:
    container: str  # FFmpeg demuxer name, as ffprobe's format_name ("mov,mp4,m4a,3gp,3g2,mj2")
    codec: str
    duration_s: float
    fps: float  # average frame rate
    width: int
    height: int
    num_frames: int  # header count when it agrees with duration * fps, else what the decoder found
    num_bytes: int
    backend: str  # decoder that decodes it: a DECODERS key, or "image"


@dataclass(frozen=True)
class Window:
    start_s: float
    end_s: float
    indices: tuple[int, ...]  # frame indices into the source video, ascending
    timestamps_s: tuple[float, ...]  # index / fps: seconds from the first frame


@dataclass(frozen=True)
class Clip:
    """What the model sees for one window."""

    window: Window
    frames: np.ndarray  # [N, H, W, 3] uint8 RGB, N = len(window.indices)
    fps: float  # source fps (the Qwen processors need the real fps)


@dataclass(frozen=True)
class Video:
    info: VideoInfo
    clips: tuple[Clip, ...]  # one per window, in time order


def probe(source: VideoSource, limits: VideoLimits = VideoLimits(), backend: str = "auto"
          ) -> VideoInfo:
    """Validate `source` and read its metadata; `info.backend` names the decoder that opened it."""
    return _load(source, None, limits, backend).info


def load_video(source: VideoSource, sampling: SamplingConfig = SamplingConfig(),
               limits: VideoLimits = VideoLimits(), backend: str = "auto") -> Video:
    """Decode the frames `sampling` picks in each window. `auto` tries decord, then PyAV if
    decord cannot open or decode the video. Frames shared by overlapping windows decode once."""
    return _load(source, sampling, limits, backend)


def plan_windows(info: VideoInfo, sampling: SamplingConfig) -> tuple[Window, ...]:
    """Windows over the video and the frames sampled in each. Pure: no I/O.

    Frame i is shown at i / fps. A window covers [start_s, end_s); the last window may be
    shorter and runs to the last frame; windows holding no frame are dropped. Overlapping
    windows stop at the first one that reaches the end."""
    fps, total = info.fps, info.num_frames
    duration = info.duration_s if info.duration_s > 0 else total / fps
    windows = []
    for start, end in _spans(duration, sampling.window_s, sampling.stride_s):
        first = math.ceil(start * fps - 1e-6)
        stop = total if end >= duration else min(total, math.ceil(end * fps - 1e-6))
        if stop <= first or (windows and (end - start) * fps < 1 - 1e-6):
            continue  # no frame, or a tail shorter than one frame
        if sampling.mode == "uniform":
            n = sampling.num_frames
        else:
            n = min(math.ceil((end - start) * sampling.fps - 1e-6), sampling.max_frames)
            n = max(1, min(n, stop - first))
        indices = _middle_of_segments(first, stop, n)
        windows.append(Window(start, end, indices, tuple(i / fps for i in indices)))
    return tuple(windows)


def image_as_video(image: np.ndarray | bytes, limits: VideoLimits = VideoLimits()) -> Video:
    """One image (an encoded file's bytes, or a uint8 array [H, W] / [H, W, 3|4]) as a one-frame,
    one-second video."""
    if isinstance(image, np.ndarray):
        frame, codec, num_bytes = _image_array(image), "raw", image.nbytes
    else:
        frame, codec, num_bytes = _decode_image(bytes(image), limits)
    height, width = frame.shape[:2]
    _check_size(width, height, limits)
    info = VideoInfo("image", codec, 1.0, 1.0, width, height, 1, num_bytes, "image")
    window = Window(0.0, 1.0, (0,), (0.0,))
    return Video(info, (Clip(window, frame[None], 1.0),))


# --- decoders -----------------------------------------------------------------------------


class FrameDecoder(Protocol):
    """Decodes frames of one video, already validated by PyAV, by index (presentation order)."""

    name: ClassVar[str]
    num_frames: int  # frames the decoder indexed in the stream (0: it cannot tell)

    def __init__(self, source: _Source, info: VideoInfo, deadline: _Deadline) -> None: ...

    @staticmethod
    def available() -> bool: ...

    def read(self, indices: Sequence[int]) -> np.ndarray:
        """Frames [len(indices), H, W, 3] uint8 RGB; an index past the last decodable frame
        gives the last decodable frame."""
        ...

    def close(self) -> None: ...


class DecordDecoder:
    """decord (the `decord2` build), run in a child process forked for this video.

    NOTE: decord segfaults on some corrupt files that FFmpeg itself decodes (found by fuzzing
    decord2 3.4) and blocks in C++ without a clock. In a child, a crash is a VideoError and a
    hang is killed at the deadline; the engine's process survives both. The child is forked,
    not spawned: a spawned or forkserver child re-imports the caller's `__main__` (torch, the
    CLI, a Ray worker...) for every video, and decord takes 0.6 s to import."""

    name: ClassVar[str] = "decord"

    def __init__(self, source: _Source, info: VideoInfo, deadline: _Deadline) -> None:
        import decord  # noqa: F401 - imported here once, so that forked children have it

        self._deadline = deadline
        ctx = multiprocessing.get_context("fork")
        self._conn, child = ctx.Pipe()
        self._worker = ctx.Process(target=_decord_worker, args=(child, self._conn, source),
                                   daemon=True)
        self._worker.start()
        child.close()
        self.num_frames = self._reply("opening the video")

    @staticmethod
    def available() -> bool:
        return importlib.util.find_spec("decord") is not None

    def read(self, indices: Sequence[int]) -> np.ndarray:
        with suppress(OSError):  # a dead worker: _reply says how it died
            self._conn.send(list(indices))
        return self._reply("decoding")

    def close(self) -> None:
        self._conn.close()
        if self._worker.is_alive():
            self._worker.kill()
        self._worker.join()

    def _reply(self, doing: str):
        if not self._conn.poll(self._deadline.left()):
            self.close()
            raise self._deadline.expired(doing)
        try:
            ok, value = self._conn.recv()
        except (EOFError, OSError):
            self.close()
            code = self._worker.exitcode
            raise VideoError(f"decord crashed while {doing} (exit code {code})") from None
        if not ok:
            self.close()  # the child has exited
            raise VideoError(f"decord failed while {doing} ({value})")
        return value


def _decord_worker(conn: Connection, parent_end: Connection, source: _Source) -> None:
    """Child process: open the video, reply with its frame count, then answer each list of
    indices with frames [N, H, W, 3] until the parent hangs up. Replies are (ok, value)."""
    parent_end.close()  # forked copy; closed so that recv() sees EOF when the parent goes
    faulthandler.disable()  # a crash here is expected; the parent reports it
    try:
        import decord

        reader = decord.VideoReader(source.open(), decord.cpu(0))
        last = len(reader) - 1
        conn.send((True, len(reader)))
        while True:
            indices = conn.recv()
            conn.send((True, reader.get_batch([min(i, last) for i in indices]).asnumpy()))
    except EOFError:
        return
    except Exception as err:  # noqa: BLE001 - sent to the parent, which raises VideoError
        conn.send((False, _one_line(err)))


class PyAVDecoder:
    """PyAV (FFmpeg): a frame's index is its rank among the stream's packet timestamps, as in
    decord; jumps seek to the nearest keyframe. Streams without timestamps decode sequentially."""

    name: ClassVar[str] = "pyav"

    def __init__(self, source: _Source, info: VideoInfo, deadline: _Deadline) -> None:
        self._source, self._info, self._deadline = source, info, deadline
        # [F] sorted packet pts, ranks of keyframes among them, whether packets carry pts at all
        self._pts, self._keys, self._timed = _packet_index(source, deadline)
        self.num_frames = len(self._pts)
        self._container: av.container.InputContainer | None = None
        self._frames: Iterator[av.VideoFrame] = iter(())
        self._pos, self._last = -1, None  # index and frame last decoded

    @staticmethod
    def available() -> bool:
        return True

    def read(self, indices: Sequence[int]) -> np.ndarray:
        out = {}
        for i in sorted(set(indices)):
            self._seek_for(i)
            while self._pos < i and (frame := next(self._frames, None)) is not None:
                self._pos, self._last = self._index_of(frame), frame
            if self._last is None:
                raise VideoError("no decodable video frames")
            out[i] = self._last.to_ndarray(  # same size as probed even if the stream changes size
                format="rgb24", width=self._info.width, height=self._info.height)
        return np.stack([out[i] for i in indices])

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None

    def _seek_for(self, i: int) -> None:
        """Position the decoder so that decoding on reaches frame i with the least work."""
        if self._container is None or i < self._pos:
            self._restart()
        key = self._keys[bisect_right(self._keys, i) - 1]
        if key <= max(self._pos, 0):
            return  # no keyframe to skip ahead to
        self._container.seek(int(self._pts[key]), stream=self._stream, backward=True)
        self._frames = _decode(self._container, self._stream, self._deadline)
        frame = next(self._frames, None)
        if frame is None or self._index_of(frame) > i:  # NOTE: demuxers that seek by dts may
            self._restart()  # overshoot; then decode from the start
        else:
            self._pos, self._last = self._index_of(frame), frame

    def _restart(self) -> None:
        self.close()
        self._container = _open_container(self._source, self._deadline)
        self._stream = _video_stream(self._container)
        self._stream.thread_type = "AUTO"
        self._frames = _decode(self._container, self._stream, self._deadline)
        self._pos, self._last = -1, None

    def _index_of(self, frame: av.VideoFrame) -> int:
        if not self._timed or frame.pts is None:
            return self._pos + 1
        return int(np.searchsorted(self._pts, frame.pts))


DECODERS: dict[str, type[FrameDecoder]] = {"decord": DecordDecoder, "pyav": PyAVDecoder}


# --- probing ------------------------------------------------------------------------------


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


def _load(source: VideoSource, sampling: SamplingConfig | None, limits: VideoLimits,
          backend: str) -> Video:
    names = _backends(backend)
    deadline = _Deadline(limits.timeout_s)
    src = _resolve(source, limits)
    header = _probe_header(src, limits, deadline)
    for name in names:
        try:
            return _decode_with(DECODERS[name], src, header, sampling, limits, deadline)
        except (VideoTimeoutError, VideoTooLargeError):
            raise
        except VideoError:
            if name == names[-1]:
                raise
    raise AssertionError("no video backend installed")


def _backends(backend: str) -> list[str]:
    """Decoders to try, in order: every installed one for `auto`, else the one named."""
    if backend == "auto":
        return [name for name, cls in DECODERS.items() if cls.available()]
    _require(backend in DECODERS, f"video backend must be auto or one of "
             f"{', '.join(DECODERS)}, not {backend!r}")
    _require(DECODERS[backend].available(), f"video backend {backend!r} is not installed")
    return [backend]


def _decode_with(decoder_cls: type[FrameDecoder], src: _Source, header: VideoInfo,
                 sampling: SamplingConfig | None, limits: VideoLimits, deadline: _Deadline
                 ) -> Video:
    """Open `src` with one decoder, settle the frame count, decode what `sampling` picks."""
    with _translate(f"{decoder_cls.name} could not decode the video"):
        decoder = decoder_cls(src, header, deadline)
        try:
            info = _settle(header, decoder.num_frames, decoder_cls.name)
            _require(info.num_frames > 0, "no video frames", VideoError)
            _check_limits(info, limits)
            if sampling is None:
                return Video(info, ())
            windows = plan_windows(info, sampling)
            wanted = sorted({i for window in windows for i in window.indices})
            frames = decoder.read(wanted)  # [len(wanted), H, W, 3]
            deadline.check("decoding")
        finally:
            decoder.close()
    row = {index: r for r, index in enumerate(wanted)}
    clips = tuple(Clip(w, frames[[row[i] for i in w.indices]], info.fps) for w in windows)
    return Video(info, clips)


def _settle(header: VideoInfo, counted: int, backend: str) -> VideoInfo:
    """The header's metadata with the frame count the decoder found (if any); a duration that
    disagrees with the count lied too and is recomputed from it."""
    num_frames, duration = counted or header.num_frames, header.duration_s
    if not (duration and _agree(num_frames, duration, header.fps)):
        duration = num_frames / header.fps
    return replace(header, num_frames=num_frames, duration_s=duration, backend=backend)


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


def _probe_header(src: _Source, limits: VideoLimits, deadline: _Deadline) -> VideoInfo:
    """Metadata from PyAV, checked against the limits, after decoding one frame."""
    container = _open_container(src, deadline)
    try:
        with _translate("could not read the video"):
            fmt = container.format.name
            if fmt in _REFUSED_FORMATS or fmt.endswith("_pipe"):
                raise UnsupportedVideoError(f"not a video (FFmpeg reads it as {fmt})")
            stream = _video_stream(container)
            _check_size(stream.codec_context.width, stream.codec_context.height, limits)
            declared, duration = stream.frames, _duration_s(container, stream)
            fps = _rate(stream) or (declared / duration if declared and duration else 0.0)
            _require(0 < fps <= _MAX_FPS, "cannot tell the frame rate", VideoError)
            # Declared counts lie (truncated files); keep one only if duration * fps agrees.
            trusted = declared > 0 and (not duration or _agree(declared, duration, fps))
            info = VideoInfo(fmt, stream.codec_context.name, duration, fps,
                             stream.codec_context.width, stream.codec_context.height,
                             declared if trusted else round(duration * fps), src.num_bytes,
                             "pyav")
            _check_limits(info, limits)
            first = next(_decode(container, stream, deadline), None)
            _require(first is not None, "no decodable video frames", VideoError)
            _check_size(first.width, first.height, limits)  # the header may have lied
            return replace(info, width=first.width, height=first.height)
    finally:
        container.close()


def _open_container(src: _Source, deadline: _Deadline) -> av.container.InputContainer:
    try:
        return av.open(src.open(), timeout=max(deadline.left(), 0.01))
    except Exception as err:  # FFmpeg raises many types; none of them may escape as-is
        deadline.check("opening the video")
        raise UnsupportedVideoError(f"not a video FFmpeg can read ({_one_line(err)})") from err


def _video_stream(container: av.container.InputContainer) -> av.VideoStream:
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams})
        raise UnsupportedVideoError(f"no video stream ({' and '.join(kinds)} only)" if kinds
                                    else "no streams found (truncated or not a video)")
    stream = container.streams.best("video")
    if stream.disposition & av.stream.Disposition.attached_pic:
        raise UnsupportedVideoError("no video stream (only a cover picture)")
    return stream


def _decode(container: av.container.InputContainer, stream: av.VideoStream,
            deadline: _Deadline) -> Iterator[av.VideoFrame]:
    """Frames in presentation order, skipping packets the decoder rejects; a demuxer error (a
    truncated file) ends the stream."""
    packets, bad = container.demux(stream), 0
    while True:
        deadline.check("decoding")
        try:
            packet = next(packets)
        except StopIteration:
            return
        except av.FFmpegError:
            packet = None  # flush what the decoder holds, then stop
        try:
            frames = stream.decode(packet)
            bad = 0
        except av.FFmpegError as err:
            bad += 1
            if bad > _MAX_BAD_PACKETS:
                raise VideoError(f"corrupt video: {bad} packets in a row could not be decoded "
                                 f"({_one_line(err)})") from err
            continue
        yield from frames
        if packet is None:
            return


def _packet_index(src: _Source, deadline: _Deadline) -> tuple[np.ndarray, list[int], bool]:
    """Sorted pts of the video packets ([F] int64), the ranks of keyframes among them, and
    whether every packet had a pts (if not: pts = 0..F-1 and the only keyframe is 0)."""
    container = _open_container(src, deadline)
    pts, keys = [], []
    try:
        for packet in container.demux(_video_stream(container)):
            deadline.check("indexing the video")
            if packet.size > 0:
                pts.append(packet.pts)
                keys.append(packet.is_keyframe)
    except av.FFmpegError:
        pass  # a truncated file: index the packets read so far
    finally:
        container.close()
    if any(p is None for p in pts):
        return np.arange(len(pts)), [0], False
    order = np.argsort(pts, kind="stable")
    key_ranks = [0] + [r for r, p in enumerate(order.tolist()) if keys[p] and r > 0]
    return np.asarray(pts, np.int64)[order], key_ranks, True


def _agree(num_frames: int, duration_s: float, fps: float) -> bool:
    return abs(num_frames - duration_s * fps) <= max(2, 0.1 * num_frames)


def _rate(stream: av.VideoStream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and 0 < float(rate) <= _MAX_FPS:
            return float(rate)
    return 0.0


def _duration_s(container: av.container.InputContainer, stream: av.VideoStream) -> float:
    if stream.duration and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    else:
        duration = (container.duration or 0) / av.time_base
    return duration if math.isfinite(duration) and duration > 0 else 0.0


def _check_size(width: int, height: int, limits: VideoLimits) -> None:
    _require(width > 0 and height > 0, f"invalid frame size {width}x{height} (corrupt header?)",
             VideoError)
    _require(width * height <= limits.max_pixels, f"frame size {width}x{height} is over the "
             f"limit of {limits.max_pixels} pixels", VideoTooLargeError)


def _check_limits(info: VideoInfo, limits: VideoLimits) -> None:
    _require(info.duration_s <= limits.max_duration_s, f"duration {info.duration_s:.1f} s is "
             f"over the limit of {limits.max_duration_s:g} s", VideoTooLargeError)
    _require(info.num_frames <= limits.max_frames, f"{info.num_frames} frames is over the "
             f"limit of {limits.max_frames} frames", VideoTooLargeError)


# --- sampling -----------------------------------------------------------------------------


def _spans(duration: float, window_s: float | None, stride_s: float | None
           ) -> Iterator[tuple[float, float]]:
    if window_s is None:
        yield 0.0, duration
        return
    stride = stride_s or window_s
    count = math.floor(max(0.0, duration - window_s) / stride + 1e-9) + 2
    _require(count <= _MAX_WINDOWS, f"window_s={window_s:g} / stride_s={stride:g} give over "
             f"{_MAX_WINDOWS} windows for a {duration:.0f} s video")
    for k in range(count):
        start = k * stride
        if start >= duration:
            return
        end = min(start + window_s, duration)
        yield start, end
        if end >= duration:
            return


def _middle_of_segments(first: int, stop: int, n: int) -> tuple[int, ...]:
    """Index of the middle frame of each of n equal segments of frames [first, stop).
    Fewer than n frames: indices repeat, so there are always n."""
    count = stop - first
    return tuple(first + (2 * k + 1) * count // (2 * n) for k in range(n))


# --- helpers ------------------------------------------------------------------------------


def _image_array(image: np.ndarray) -> np.ndarray:
    _require(image.dtype == np.uint8 and (image.ndim == 2 or (
        image.ndim == 3 and image.shape[2] in (1, 3, 4))),
        f"an image array must be uint8 [H, W] or [H, W, 3|4], not {image.dtype} {image.shape}")
    if image.ndim == 2:
        image = image[:, :, None]
    return np.ascontiguousarray(np.broadcast_to(image[:, :, :3], (*image.shape[:2], 3)))


def _decode_image(data: bytes, limits: VideoLimits) -> tuple[np.ndarray, str, int]:
    _require(0 < len(data) <= limits.max_bytes, f"image is {len(data)} bytes; it must be 1 to "
             f"{limits.max_bytes}", VideoTooLargeError if data else UnsupportedVideoError)
    try:
        with Image.open(io.BytesIO(data)) as img:
            _check_size(*img.size, limits)
            return np.asarray(img.convert("RGB")), (img.format or "unknown").lower(), len(data)
    except VideoError:
        raise
    except Image.DecompressionBombError as err:
        raise VideoTooLargeError(f"image is over Pillow's size limit ({err})") from err
    except Exception as err:  # PIL raises many types on bad bytes
        raise UnsupportedVideoError(f"not an image Pillow can read ({_one_line(err)})") from err


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


def _one_line(err: BaseException) -> str:
    """An exception's message on one line, without decord's log prefixes or file names."""
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return _LOG_PREFIX.sub("", " ".join(str(text).split()))[:200]
