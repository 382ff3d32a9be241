"""Coverage sampling: find the shots of a video from how much every frame changes from the one
before (measured on tiny thumbnails, `decoders.frame_changes`), then pick judged times so that
every shot of at least `min_shot_s` has a judged frame and no gap between judged frames (or
from the start, or to the end) exceeds `max_gap_s`, within a frame budget. Pure: changes and
times in, times out.

What the cut detector does not see (a slow fade, a change confined to a few pixels of a 32x18
thumbnail) is covered only by the `max_gap_s` bound, which holds whatever the content."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CUT_MIN = 20.0      # change (see decoders.frame_changes, 0..255) that always counts as a cut
CUT_RELATIVE = 4.0  # ... or this many times the video's median change, when that is larger


THUMB = (32, 18)    # thumbnail width, height for the change measure
GRID = (4, 3)       # blocks across, down


def centred(thumb: np.ndarray) -> np.ndarray:
    """[h, w, 3] uint8 thumbnail -> float32 with its own mean removed (brightness flicker
    cancels out)."""
    out = thumb.astype(np.float32)
    return out - out.mean()


def change(previous: np.ndarray, current: np.ndarray) -> float:
    """How much a frame changed from the one before (both `centred` thumbnails): the largest,
    over a GRID of blocks, mean absolute difference (0..255), so a change over one block (an
    insert over part of the picture) counts as much as one over all of it."""
    h, w = current.shape[:2]
    gx, gy = GRID
    d = np.abs(current - previous)[: h - h % gy, : w - w % gx]
    return float(d.reshape(gy, h // gy, gx, w // gx, 3).mean(axis=(1, 3, 4)).max())


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


def find_shots(changes: np.ndarray, times_s: np.ndarray, end_s: float) -> tuple[Shot, ...]:
    """Shots from `changes` [F-1] (frame i+1 against frame i, presentation order): a cut lies
    before frame i+1 when its change is at least CUT_MIN or CUT_RELATIVE times the median
    change, whichever is larger. The median cannot be inflated by global brightness flicker
    (changes are measured after removing each thumbnail's mean)."""
    if len(changes) == 0:
        return (Shot(0.0, end_s),)
    threshold = max(CUT_MIN, CUT_RELATIVE * float(np.median(changes)))
    cuts = (np.nonzero(changes >= threshold)[0] + 1).tolist()
    bounds = [0.0, *(float(times_s[i]) for i in cuts), end_s]
    return tuple(Shot(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a)


def plan_coverage(shots: tuple[Shot, ...], end_s: float, min_shot_s: float, max_gap_s: float,
                  max_frames: int) -> CoveragePlan:
    """Judged times: the middle of every shot of at least `min_shot_s`, then more times where
    a gap (from 0, between judged times, to the end) exceeds `max_gap_s`, then the middle of
    shorter shots while the budget allows. Over budget, shots come first: the long shots'
    middles (spread evenly over them when even they do not fit), then gap times spread evenly
    with what is left; a warning says how much coverage was cut."""
    long = [s for s in shots if s.length_s >= min_shot_s - 1e-9]
    middles = sorted({_mid(s) for s in long} or {end_s / 2})
    times = _fill_gaps(middles, end_s, max_gap_s)
    warnings: list[str] = []
    if len(times) > max_frames:
        needed = len(times)
        kept = _spread(middles, max_frames)
        fills = sorted(set(times) - set(middles))
        kept = sorted(set(kept) | set(_spread(fills, max_frames - len(kept))))
        seen = sum(any(s.start_s <= t < s.end_s for t in kept) for s in long)
        warnings.append(
            f"coverage cut by the frame budget: {needed} frames needed for every shot of "
            f"{min_shot_s:g} s or more and gaps of at most {max_gap_s:g} s, max_frames is "
            f"{max_frames}; {seen} of {len(long)} such shots judged, the largest gap "
            f"{_largest_gap(kept, end_s):.1f} s")
        times = kept
    else:
        short = sorted((s for s in shots if s.length_s < min_shot_s - 1e-9),
                       key=lambda s: -s.length_s)
        extra = [_mid(s) for s in short[: max_frames - len(times)]]
        times = sorted(set(times) | set(extra))
    return CoveragePlan(tuple(times), shots, tuple(warnings))


def _spread(items: list[float], k: int) -> list[float]:
    """At most k of `items` (ascending), evenly spaced over them."""
    if k <= 0 or not items:
        return []
    if len(items) <= k:
        return list(items)
    picks = np.linspace(0, len(items) - 1, k).round().astype(int)
    return [items[i] for i in sorted(set(picks.tolist()))]


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
