"""Coverage sampling: find the shots of a video from tiny thumbnails of every frame, then pick
judged times so that every shot of at least `min_shot_s` has a judged frame and no gap between
judged frames (or from the start, or to the end) exceeds `max_gap_s`, within a frame budget.
Pure: thumbnails and times in, times out."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CUT_MIN = 12.0      # mean absolute thumbnail difference (0..255) that always counts as a cut
CUT_RELATIVE = 4.0  # ... or this many times the video's median frame-to-frame difference


@dataclass(frozen=True)
class Shot:
    start_s: float
    end_s: float

    @property
    def length_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True)
class CoveragePlan:
    times_s: tuple[float, ...]     # judged times, ascending
    shots: tuple[Shot, ...]        # every shot the pass found
    warnings: tuple[str, ...]      # where the budget cut coverage


def find_shots(thumbs: np.ndarray, times_s: np.ndarray, end_s: float) -> tuple[Shot, ...]:
    """Shots from thumbnails [F, h, w, 3] uint8 of every frame in presentation order: a cut
    lies before frame i when it differs from frame i-1 by at least CUT_MIN (mean absolute
    difference) or CUT_RELATIVE times the median difference, whichever is larger."""
    if len(thumbs) < 2:
        return (Shot(0.0, end_s),)
    x = thumbs.astype(np.int16)
    diff = np.abs(x[1:] - x[:-1]).mean(axis=(1, 2, 3))                 # [F-1]
    threshold = max(CUT_MIN, CUT_RELATIVE * float(np.median(diff)))
    cuts = (np.nonzero(diff >= threshold)[0] + 1).tolist()
    bounds = [0.0, *(float(times_s[i]) for i in cuts), end_s]
    return tuple(Shot(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a)


def plan_coverage(shots: tuple[Shot, ...], end_s: float, min_shot_s: float, max_gap_s: float,
                  max_frames: int) -> CoveragePlan:
    """Judged times: the middle of every shot of at least `min_shot_s`, then more times where
    a gap (from 0, between judged times, to the end) exceeds `max_gap_s`, then the middle of
    shorter shots while the budget allows. Over budget: the long shots' times spread evenly over
    the video, and a warning saying how much coverage was cut."""
    long = [s for s in shots if s.length_s >= min_shot_s - 1e-9]
    times = sorted({_mid(s) for s in long} or {end_s / 2})
    times = _fill_gaps(times, end_s, max_gap_s)
    warnings: list[str] = []
    if len(times) > max_frames:
        needed = len(times)
        keep = np.linspace(0, needed - 1, max_frames).round().astype(int)
        times = [times[i] for i in sorted(set(keep.tolist()))]
        seen = sum(any(s.start_s <= t < s.end_s for t in times) for s in long)
        warnings.append(
            f"coverage cut by the frame budget: {needed} frames needed for every shot of "
            f"{min_shot_s:g} s or more and gaps of at most {max_gap_s:g} s, max_frames is "
            f"{max_frames}; {seen} of {len(long)} such shots judged, the largest gap "
            f"{_largest_gap(times, end_s):.1f} s")
    else:
        short = sorted((s for s in shots if s.length_s < min_shot_s - 1e-9),
                       key=lambda s: -s.length_s)
        extra = [_mid(s) for s in short[: max_frames - len(times)]]
        times = sorted(set(times) | set(extra))
    return CoveragePlan(tuple(times), shots, tuple(warnings))


def _mid(shot: Shot) -> float:
    return (shot.start_s + shot.end_s) / 2


def _fill_gaps(times: list[float], end_s: float, max_gap_s: float) -> list[float]:
    """Times added evenly inside every gap longer than max_gap_s (the first judged time at most
    max_gap_s / 2 from the start, the last at most max_gap_s / 2 before the end)."""
    out: list[float] = []
    edges = [-max_gap_s / 2, *times, end_s + max_gap_s / 2]
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        if a >= 0:
            out.append(a)
        parts = math.ceil((b - a) / max_gap_s - 1e-9)
        out += [a + (b - a) * k / parts for k in range(1, parts) if 0 <= a + (b - a) * k / parts
                < end_s]
    return sorted(set(out))


def _largest_gap(times: list[float], end_s: float) -> float:
    edges = [0.0, *times, end_s]
    return max(b - a for a, b in zip(edges[:-1], edges[1:], strict=True))
