"""PyAV validation: the checked header `VideoInfo` of an input that FFmpeg opens, that has a
video stream of sane size within the limits, and whose first frame decodes. Also the PyAV
primitives (open, pick the stream, decode leniently) that `PyAVDecoder` reuses."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace

import av

from guardrail.errors import UnsupportedVideoError, VideoError, VideoTooLargeError
from guardrail.video.source import _Deadline, _one_line, _Source, _translate
from guardrail.video.types import VideoInfo, VideoLimits, _require

_MAX_FPS = 1000.0  # a stream rate above this is a broken header, not a video
_MAX_BAD_PACKETS = 64  # undecodable packets in a row before a file counts as corrupt
# Demuxers that read other files or URLs named inside the input, and still images.
_REFUSED_FORMATS = frozenset({"hls", "dash", "concat", "image2", "sdp", "rtsp", "rtp", "tee",
                              # headerless formats FFmpeg also finds in arbitrary bytes (a
                              # 24-byte fuzz input read as CD+G karaoke graphics): not videos
                              "cdg", "tty", "bin", "xbin", "idf", "adf"})


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
            # a count derived from duration * rate means nothing for a variable-rate stream: the
            # frames are counted from the packets later (video.timeline)
            _check_limits(replace(info, num_frames=declared if trusted else 0), limits)
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


MAX_ASPECT = 200  # longer side / shorter side; the Qwen-VL processors refuse more


def _check_size(width: int, height: int, limits: VideoLimits) -> None:
    _require(width > 0 and height > 0, f"invalid frame size {width}x{height} (corrupt header?)",
             VideoError)
    _require(max(width, height) <= MAX_ASPECT * min(width, height),
             f"frame size {width}x{height} is too thin to judge: the longer side may be at most "
             f"{MAX_ASPECT} times the shorter", VideoError)
    _require(width * height <= limits.max_pixels, f"frame size {width}x{height} is over the "
             f"limit of {limits.max_pixels} pixels", VideoTooLargeError)


def _check_limits(info: VideoInfo, limits: VideoLimits) -> None:
    _require(info.duration_s <= limits.max_duration_s, f"duration {info.duration_s:.1f} s is "
             f"over the limit of {limits.max_duration_s:g} s", VideoTooLargeError)
    _require(info.num_frames <= limits.max_frames, f"{info.num_frames} frames is over the "
             f"limit of {limits.max_frames} frames", VideoTooLargeError)
