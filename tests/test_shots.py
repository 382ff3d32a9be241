"""Coverage sampling (guardrail.video.shots and the coverage windows): shots found from
thumbnails, every shot of at least min_shot_s judged, no gap over max_gap_s, the budget's cut
reported. Pure functions, plus the variable-frame-rate and insert videos end to end."""

from __future__ import annotations

import numpy as np
import pytest
import videos
from hypothesis import given, settings
from hypothesis import strategies as st

from guardrail.video import SamplingConfig, load_video, plan_video
from guardrail.video.sampling import coverage_windows
from guardrail.video.shots import Shot, centred, change, find_shots, plan_coverage

FPS = 24.0


def _changes(shot_lengths: list[int], seed: int, flicker: int = 0) -> np.ndarray:
    """Changes between 18x32 thumbnails of shots of the given frame counts: each shot a random
    two-tone picture (its split and colours far from the previous shot's), a little noise,
    and optionally global brightness flicker of +-`flicker` every frame."""
    rng = np.random.default_rng(seed)
    thumbs, last = [], None
    for n in shot_lengths:
        while True:
            a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
            if last is None or min(np.abs(a - last[0]).max(), np.abs(b - last[1]).max()) > 60:
                break
        last = (a, b)
        split = int(rng.integers(4, 28))
        base = np.empty((18, 32, 3), int)
        base[:, :split], base[:, split:] = a, b
        for _ in range(n):
            noise = rng.integers(-3, 4, base.shape)
            thumbs.append(base + noise + flicker * (1 if len(thumbs) % 2 else -1))
    frames = [centred(np.clip(t, 0, 255).astype(np.uint8)) for t in thumbs]
    return np.array([change(p, c) for p, c in zip(frames[:-1], frames[1:], strict=True)])


@settings(max_examples=150, deadline=None)
@given(lengths=st.lists(st.integers(1, 240), min_size=1, max_size=40),
       seed=st.integers(0, 2**16), min_shot=st.sampled_from([0.25, 0.5, 1.0]),
       max_gap=st.sampled_from([2.0, 5.0, 10.0]))
def test_every_long_enough_shot_is_judged_and_no_gap_is_too_long(lengths, seed, min_shot,
                                                                  max_gap):
    """Shots of random lengths at random places (frame counts at 24 fps): with a budget that
    fits, every shot of at least min_shot_s gets a judged time inside it, and no gap from the
    start, between judged times or to the end exceeds max_gap_s."""
    changes = _changes(lengths, seed)
    end = (len(changes) + 1) / FPS
    shots = find_shots(changes, np.arange(len(changes) + 1) / FPS, end)
    plan = plan_coverage(shots, end, min_shot, max_gap, max_frames=10_000)
    assert plan.warnings == ()
    starts = np.cumsum([0, *lengths]) / FPS
    for a, b in zip(starts[:-1], starts[1:], strict=True):        # the shots as made
        if b - a >= min_shot:
            assert any(a <= t < b for t in plan.times_s), (a, b)
    edges = [0.0, *plan.times_s, end]
    assert max(y - x for x, y in zip(edges[:-1], edges[1:], strict=True)) <= max_gap + 1e-9
    assert list(plan.times_s) == sorted(plan.times_s) and all(0 <= t < end for t in plan.times_s)


def test_brightness_flicker_does_not_hide_cuts():
    """+-15 brightness every frame (which would put the median change above any cut) leaves
    the four shots found."""
    changes = _changes([48, 96, 24, 72], seed=3, flicker=15)
    shots = find_shots(changes, np.arange(len(changes) + 1) / FPS, 240 / FPS)
    assert [round(s.length_s * FPS) for s in shots] == [48, 96, 24, 72]


def test_over_budget_the_shots_come_before_the_gaps():
    """A long still, a 4 s shot, a long still: with a budget far below the gap frames the
    short shot is still judged."""
    shots = (Shot(0.0, 3600.0), Shot(3600.0, 3604.0), Shot(3604.0, 7200.0))
    plan = plan_coverage(shots, 7200.0, 0.5, 5.0, max_frames=64)
    assert len(plan.times_s) <= 64 and any(3600 <= t < 3604 for t in plan.times_s)
    assert plan.warnings and "3 of 3 such shots judged" in plan.warnings[0]


def test_the_budget_cut_is_a_warning_with_the_numbers():
    shots = tuple(Shot(float(i), float(i + 1)) for i in range(100))
    plan = plan_coverage(shots, 100.0, 0.5, 5.0, max_frames=10)
    assert len(plan.times_s) == 10
    assert len(plan.warnings) == 1 and "100 frames needed" in plan.warnings[0]
    assert "10 of 100 such shots judged" in plan.warnings[0]


def test_coverage_windows_hold_at_most_per_window_frames():
    times = np.arange(300) / 10
    judged = tuple(float(t) for t in np.linspace(0.5, 29.5, 19))
    windows = coverage_windows(times, judged, 30.0, 8)
    assert [len(w.indices) for w in windows] == [8, 8, 3]
    assert windows[0].start_s == 0.0 and windows[-1].end_s == 30.0
    assert all(a.end_s == b.start_s for a, b in zip(windows[:-1], windows[1:], strict=True))
    for w in windows:
        assert all(w.start_s <= t < w.end_s for t in w.timestamps_s)
        assert list(w.indices) == [int(t * 10 + 1e-9) for t in w.timestamps_s]


BLUE = (0, 0, 200)


@pytest.mark.parametrize("fmt", ["mp4_h264", "mkv_h264", "webm_vp9"])
def test_a_half_second_insert_is_judged_under_coverage_and_missed_by_uniform(fmt):
    frames = [(i / 10, videos.RED if 132 <= i < 137 else BLUE) for i in range(300)]
    data = videos.encode_timed(frames, fmt)
    cov = load_video(data, SamplingConfig(mode="coverage"))
    seen = [videos.colour_of(f) for c in cov.clips for f in c.frames]
    assert "red" in seen and cov.sampling == "coverage" and cov.shots == 3
    uni = load_video(data, SamplingConfig(num_frames=8))
    assert "red" not in [videos.colour_of(f) for f in uni.clips[0].frames]


@pytest.mark.parametrize("fmt", ["mp4_h264", "mkv_h264", "webm_vp9"])
@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_variable_frame_rate_tricks_are_judged_over_playback(fmt, backend):
    """300 green frames in 0.3 s then red held to 50 minutes: judged red over 3,000 s, not
    30 s of green; three frames spanning 3 h 54 min: that duration, every frame seen."""
    vfr = load_video(videos.green_then_red_for_50_minutes(fmt), SamplingConfig(num_frames=8),
                     backend=backend)
    assert vfr.info.duration_s == pytest.approx(3000.3, abs=0.05)
    assert [videos.colour_of(f) for f in vfr.clips[0].frames] == ["red"] * 8
    hours = load_video(videos.three_frames_over_hours(fmt), SamplingConfig(num_frames=8),
                       backend=backend)
    assert hours.info.duration_s == pytest.approx(14040.0, abs=0.05)
    assert hours.clips[0].window.indices == (0, 0, 0, 0, 1, 1, 1, 1)
    assert hours.clips[0].window.timestamps_s[-1] == pytest.approx(14040 * 15 / 16)


def test_plan_video_reports_without_decoding_the_judged_frames():
    planned = plan_video(videos.green_then_red_for_50_minutes(), SamplingConfig(mode="coverage"))
    assert planned.sampling == "coverage" and planned.shots == 2
    assert planned.clips[0].frames.shape[1:3] == (0, 0)
    assert planned.info.duration_s == pytest.approx(3000.3, abs=0.05)
