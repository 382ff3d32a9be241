"""Which frames the model sees: `plan_windows` turns a video's metadata, its frames'
presentation times and a `SamplingConfig` into `Window`s, each with the frames sampled in it;
`coverage_windows` groups the times a coverage plan judges into windows. Pure: no I/O.

Everything is in playback time: a window covers [start_s, end_s) of playback, and a sampled
time shows the frame on screen at that moment, however long the stream holds it."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from guardrail.video.types import SamplingConfig, VideoInfo, Window, _require

_MAX_WINDOWS = 100_000


def cfr_times(info: VideoInfo) -> np.ndarray:
    """[F] presentation times of a constant-rate stream: i / fps."""
    return np.arange(info.num_frames, dtype=np.float64) / info.fps


def plan_windows(info: VideoInfo, sampling: SamplingConfig,
                 times_s: np.ndarray | None = None) -> tuple[Window, ...]:
    """Windows over the playback and the frames sampled in each (uniform and fps modes).

    `times_s` [F]: each frame's presentation time, ascending (default: i / fps). A window
    covers [start_s, end_s); the last may be shorter (a tail shorter than one nominal frame is
    dropped); overlapping windows stop at the first one that reaches the end. In each window
    the frame on screen at the middle of each of n equal time segments is sampled."""
    _require(sampling.mode in ("uniform", "fps"), "plan_windows takes uniform or fps sampling; "
             "coverage needs the shots of the video (coverage_windows)")
    times = cfr_times(info) if times_s is None else np.asarray(times_s, np.float64)
    duration = info.duration_s if info.duration_s > 0 else info.num_frames / info.fps
    windows = []
    for start, end in _spans(duration, sampling.window_s, sampling.stride_s):
        if windows and (end - start) * info.fps < 1 - 1e-6:
            continue  # a tail shorter than one frame
        if sampling.mode == "uniform":
            n = sampling.num_frames
        else:
            n = min(math.ceil((end - start) * sampling.fps - 1e-6), sampling.frame_budget)
            n = max(1, min(n, _frames_in(times, start, end)))
        targets = start + (2 * np.arange(n) + 1) / (2 * n) * (end - start)
        windows.append(Window(start, end, tuple(frame_at(times, targets).tolist()),
                              tuple(float(t) for t in targets)))
    return tuple(windows)


def coverage_windows(times_s: np.ndarray, judged_s: tuple[float, ...], end_s: float,
                     per_window: int) -> tuple[Window, ...]:
    """The judged times of a coverage plan, in windows of at most `per_window` frames; window
    bounds halfway between neighbouring windows' frames (the first starts at 0, the last ends
    at the end of playback)."""
    chunks = [judged_s[i: i + per_window] for i in range(0, len(judged_s), per_window)]
    out = []
    for k, chunk in enumerate(chunks):
        start = 0.0 if k == 0 else (chunks[k - 1][-1] + chunk[0]) / 2
        end = end_s if k == len(chunks) - 1 else (chunk[-1] + chunks[k + 1][0]) / 2
        idx = frame_at(np.asarray(times_s, np.float64), np.asarray(chunk))
        out.append(Window(start, end, tuple(idx.tolist()), tuple(float(t) for t in chunk)))
    return tuple(out)


def frame_at(times_s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Index of the frame on screen at each time `t`: the last frame shown at or before it."""
    i = np.searchsorted(times_s, np.asarray(t, np.float64) + 1e-9, side="right") - 1
    return np.clip(i, 0, len(times_s) - 1)


def _frames_in(times: np.ndarray, start: float, end: float) -> int:
    """Distinct frames on screen during [start, end)."""
    first = int(frame_at(times, np.asarray(start)))
    stop = int(np.searchsorted(times, end - 1e-9, side="left"))
    return max(1, stop - first)


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
