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
    covers [start_s, end_s); the last may be shorter (a tail in which no frame starts and that
    is shorter than a frame interval and a second is dropped); overlapping windows stop at the
    first one that reaches the end. In each window the frame on screen at the middle of each of
    n equal time segments is sampled; in fps mode samples landing on the same frame count once
    (a frame held for a long time is judged once, a short one between long ones still is)."""
    _require(sampling.mode in ("uniform", "fps"), "plan_windows takes uniform or fps sampling; "
             "coverage needs the shots of the video (coverage_windows)")
    times = cfr_times(info) if times_s is None else np.asarray(times_s, np.float64)
    duration = info.duration_s if info.duration_s > 0 else info.num_frames / info.fps
    windows = []
    tail = min(1.0 / info.fps, 1.0)
    for start, end in _spans(duration, sampling.window_s, sampling.stride_s):
        if windows and end - start < tail - 1e-9 and not _starts_in(times, start, end):
            continue  # a sliver of the last frame's display time
        if sampling.mode == "uniform":
            n = sampling.num_frames
        else:
            n = max(1, min(math.ceil((end - start) * sampling.fps - 1e-6),
                           sampling.frame_budget))
        targets = start + (2 * np.arange(n) + 1) / (2 * n) * (end - start)
        idx = frame_at(times, targets)
        if sampling.mode == "fps":
            first = np.concatenate([[True], idx[1:] != idx[:-1]])
            idx, targets = idx[first], targets[first]
        windows.append(Window(start, end, tuple(idx.tolist()), tuple(float(t) for t in targets)))
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


def _starts_in(times: np.ndarray, start: float, end: float) -> bool:
    """Whether a frame starts showing during [start, end)."""
    return bool(np.searchsorted(times, start - 1e-9) < np.searchsorted(times, end - 1e-9))


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
