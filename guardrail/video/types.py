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
    # Frames are scaled down while decoding to at most this many pixels (1080p's count: the
    # models' processors resize to well under it), so a full-size copy of a larger frame is
    # never held; and the decoded frames of one video may take at most max_decoded_bytes.
    max_decode_pixels: int = 1920 * 1080
    max_decoded_bytes: int = 4 << 30

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_duration_s", "max_pixels", "max_frames", "timeout_s",
                     "max_decode_pixels", "max_decoded_bytes"):
            _require(getattr(self, name) > 0, f"video limit {name} must be positive")

    def decode_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) frames of a width x height video are decoded to: the same, or
        scaled down (aspect kept) to fit max_decode_pixels."""
        if width * height <= self.max_decode_pixels:
            return width, height
        scale = math.sqrt(self.max_decode_pixels / (width * height))
        return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))


SAMPLING_MODES = ("uniform", "fps", "coverage")


@dataclass(frozen=True)
class SamplingConfig:
    """Which frames the model sees, chosen by presentation time. `uniform` and `fps` take the
    frame on screen at the middle of each of n equal time segments of a window; `uniform` fixes
    n, `fps` derives it from the window length (capped at max_frames per window). `coverage`
    first finds the shots of the whole video, then judges a frame of every shot of at least
    `min_shot_s` with no gap over `max_gap_s` between judged frames, within max_frames per
    video, in windows of num_frames frames."""

    mode: str = "uniform"  # "uniform" | "fps" | "coverage"
    num_frames: int = 8  # uniform: exactly this many per window (frames repeat if too few);
    #                      coverage: at most this many per window
    fps: float = 1.0  # fps mode: frames per second of video ...
    max_frames: int | None = None  # fps: per window (default 32); coverage: per video (256)
    window_s: float | None = None  # window length; None = the whole video is one window
    stride_s: float | None = None  # window start-to-start distance; None = window_s
    min_shot_s: float = 0.5  # coverage: every shot this long gets a judged frame
    max_gap_s: float = 5.0  # coverage: longest time between judged frames

    def __post_init__(self) -> None:
        _require(self.mode in SAMPLING_MODES, f"sampling mode must be one of "
                 f"{', '.join(SAMPLING_MODES)}, not {self.mode!r}")
        _require(isinstance(self.num_frames, int) and self.num_frames >= 1,
                 "sampling num_frames must be a whole number, at least 1")
        _require(math.isfinite(self.fps) and self.fps > 0, "sampling fps must be positive")
        _require(self.max_frames is None or (isinstance(self.max_frames, int)
                                             and self.max_frames >= 1),
                 "sampling max_frames must be a whole number, at least 1")
        for name in ("min_shot_s", "max_gap_s"):
            value = getattr(self, name)
            _require(math.isfinite(value) and value > 0,
                     f"sampling {name} must be a positive number of seconds")
        for name in ("window_s", "stride_s"):
            value = getattr(self, name)
            _require(value is None or (math.isfinite(value) and value > 0),
                     f"sampling {name} must be a positive number of seconds")
        _require(self.stride_s is None or self.window_s is not None,
                 "sampling stride_s needs window_s")

    @property
    def frame_budget(self) -> int:
        """max_frames, or its default for the mode (fps: per window; coverage: per video)."""
        if self.max_frames is not None:
            return self.max_frames
        return 256 if self.mode == "coverage" else 32


@dataclass(frozen=True)
class VideoInfo:
    container: str  # FFmpeg demuxer name, as ffprobe's format_name ("mov,mp4,m4a,3gp,3g2,mj2")
    codec: str
    duration_s: float  # playback: from the frames' presentation timestamps where they have them
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
    indices: tuple[int, ...]  # frame indices (presentation order), ascending, may repeat
    timestamps_s: tuple[float, ...]  # when each was sampled: seconds of playback


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
    sampling: str = "uniform"  # the mode that chose the frames ("image" for a still image)
    shots: int | None = None  # coverage: shots the pass over the whole video found
    warnings: tuple[str, ...] = ()  # untrustworthy timestamps, coverage cut by the budget
