"""Which frames the model sees: `plan_windows` turns a video's metadata and a `SamplingConfig`
into `Window`s, each with the frame indices sampled in it. Pure: no I/O."""

from __future__ import annotations

import math
from collections.abc import Iterator

from guardrail.video.types import SamplingConfig, VideoInfo, Window, _require

_MAX_WINDOWS = 100_000


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
