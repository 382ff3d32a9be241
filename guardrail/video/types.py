"""The video vocabulary: limits and sampling settings (frozen, validated on construction), and
what the other stages produce from an input: `VideoInfo` (its metadata), `Window` (the frames
sampled from a span of time), `Clip` (those frames, decoded) and `Video` (all clips)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from guardrail.errors import UsageError

VideoSource = str | os.PathLike | bytes


def _require(ok: bool, message: str, error: type[Exception] = UsageError) -> None:
    if not ok:
        raise error(message)


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
