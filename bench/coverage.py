"""Coverage table: which samplers see short inserts and the variable-frame-rate tricks, at what
cost, side by side in one run. No model: "seen" is read off the judged frames' pixels.

    .venv/bin/python bench/coverage.py [--videos 8] [--out bench/results/coverage-....md]

Generated videos (PyAV, H.264 mp4, 96x54 at 24 fps; 30 s to 10 min): ordinary shots of 2-8 s
(moving gradients in green, blue, yellow, cyan hues), and at random places inserts of 0.25,
0.5, 1 and 2 s of a magenta checkerboard, three of each length per video. An insert is seen when
a judged frame sampled inside it is magenta. Then the two timing tricks from the field: 300
green frames in 0.3 s then red held to 50 minutes, and three frames spanning 3 h 54 min (seen:
a red frame judged). Per sampler: share of inserts seen per length, model frames per
video-minute, and load time (probe, timeline, coverage pass, decoding the judged frames) per
video-minute, with the default decoder.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guardrail.video import SamplingConfig, load_video  # noqa: E402

FPS, W, H = 24, 96, 54
INSERTS = (0.25, 0.5, 1.0, 2.0)
PER_LENGTH = 3
DURATIONS = (30, 45, 60, 90, 120, 180, 300, 600)
HUES = ((40, 180, 60), (30, 90, 200), (210, 200, 40), (40, 190, 190), (90, 160, 90),
        (60, 60, 160))
SAMPLERS = {
    "uniform 8": SamplingConfig(num_frames=8),
    "uniform 8 per 10 s window": SamplingConfig(num_frames=8, window_s=10.0),
    "fps 1": SamplingConfig(mode="fps", fps=1.0, max_frames=1_000_000),
    "coverage (defaults)": SamplingConfig(mode="coverage"),
}


@dataclass
class Made:
    path: Path
    duration_s: float
    inserts: list[tuple[float, float]]            # [start, end) seconds


@dataclass
class Tally:
    seen: dict[float, list[bool]] = field(default_factory=lambda: {n: [] for n in INSERTS})
    frames: int = 0
    minutes: float = 0.0
    load_s: float = 0.0
    tricks: dict[str, bool] = field(default_factory=dict)
    warnings: int = 0


def make_video(path: Path, duration_s: int, rng: np.random.Generator) -> Made:
    n = duration_s * FPS
    inserts = _place_inserts(duration_s, rng)
    marked = np.zeros(n, bool)
    for a, b in inserts:
        marked[int(round(a * FPS)): int(round(b * FPS))] = True
    cuts, t = [0], 0
    while t < n:
        t += int(rng.integers(2 * FPS, 8 * FPS))
        cuts.append(min(t, n))
    x = np.linspace(0, 1, W)[None, :, None]
    y = np.linspace(0, 1, H)[:, None, None]
    checker = ((np.arange(H)[:, None] // 6 + np.arange(W)[None, :] // 6) % 2).astype(bool)
    magenta = np.where(checker[..., None], np.array([230, 20, 230]), np.array([40, 0, 40]))
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=Fraction(FPS),
                                options={"crf": "23", "preset": "ultrafast", "g": "48"})
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for s, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
            base = np.array(HUES[int(rng.integers(len(HUES)))], float)
            tilt = rng.uniform(0.5, 1.0)
            for i in range(a, b):
                if marked[i]:
                    pixels = magenta
                else:
                    phase = (x + y * tilt + (i - a) / (4 * FPS) + s) % 1.0     # slow motion
                    pixels = base * (0.6 + 0.4 * phase)
                frame = av.VideoFrame.from_ndarray(np.clip(pixels, 0, 255).astype(np.uint8),
                                                   format="rgb24")
                out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return Made(path, float(duration_s), inserts)


def _place_inserts(duration_s: int, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Three inserts of each length at random frame-aligned places, apart from each other."""
    out: list[tuple[float, float]] = []
    for length in INSERTS * PER_LENGTH:
        while True:
            a = int(rng.integers(0, int((duration_s - length) * FPS))) / FPS
            b = a + length
            if all(b + 0.5 <= c or a >= d + 0.5 for c, d in out):
                out.append((a, b))
                break
    return sorted(out)


def timed_video(path: Path, frames: list[tuple[float, tuple[int, int, int]]]) -> Path:
    """Solid frames at the given presentation times (ms ticks), Matroska/H.264."""
    with av.open(str(path), "w", format="matroska") as out:
        stream = out.add_stream("libx264", rate=1000, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        for t, colour in [*frames, (None, None)]:
            if t is None:
                packets = stream.encode()
            else:
                pixels = np.empty((H, W, 3), np.uint8)
                pixels[:] = colour
                frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
                frame.pts, frame.time_base = round(t * 1000), Fraction(1, 1000)
                packets = stream.encode(frame)
            for packet in packets:
                packet.time_base = Fraction(1, 1000)
                out.mux(packet)
    return path


def is_magenta(frame: np.ndarray) -> bool:
    px = frame.reshape(-1, 3).astype(int)
    return float(((px[:, 0] > 150) & (px[:, 2] > 150) & (px[:, 1] < 90)).mean()) > 0.3


def is_red(frame: np.ndarray) -> bool:
    r, g, b = frame.reshape(-1, 3).mean(axis=0)
    return r > 120 > g and b < 120


def measure(made: list[Made], tricks: dict[str, Path]) -> dict[str, Tally]:
    tallies = {name: Tally() for name in SAMPLERS}
    for k, m in enumerate(made):
        for name, sampling in SAMPLERS.items():
            t = time.perf_counter()
            video = load_video(m.path, sampling)
            tally = tallies[name]
            tally.load_s += time.perf_counter() - t
            tally.minutes += m.duration_s / 60
            judged = [(ts, f) for c in video.clips
                      for ts, f in zip(c.window.timestamps_s, c.frames, strict=True)]
            tally.frames += len(judged)
            tally.warnings += bool(video.warnings)
            for a, b in m.inserts:
                tally.seen[round(b - a, 2)].append(
                    any(a <= ts < b and is_magenta(f) for ts, f in judged))
        log(f"video {k + 1}/{len(made)} ({m.duration_s:.0f} s) done")
    for trick, path in tricks.items():
        for name, sampling in SAMPLERS.items():
            video = load_video(path, sampling)
            tallies[name].tricks[trick] = any(is_red(f) for c in video.clips for f in c.frames)
    return tallies


def render(tallies: dict[str, Tally], tricks: list[str]) -> str:
    head = ("| sampler | " + " | ".join(f"inserts {n:g} s seen" for n in INSERTS)
            + " | model frames / video-min | load ms / video-min | "
            + " | ".join(tricks) + " | videos with a warning |")
    rows = [head, "|---|" + "---:|" * (len(INSERTS) + 2) + "---|" * len(tricks) + "---:|"]
    for name, t in tallies.items():
        seen = [f"{100 * np.mean(t.seen[n]):.0f}% ({sum(t.seen[n])}/{len(t.seen[n])})"
                for n in INSERTS]
        rows.append(f"| {name} | " + " | ".join(seen)
                    + f" | {t.frames / t.minutes:,.1f} | {t.load_s * 1e3 / t.minutes:,.0f} | "
                    + " | ".join("seen" if t.tricks[k] else "MISSED" for k in tricks)
                    + f" | {t.warnings} |")
    return "\n".join(rows) + "\n"


def log(msg: str) -> None:
    print(f"[coverage {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=len(DURATIONS),
                    help=f"how many of the durations {DURATIONS} (s) to use")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the table as markdown here")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        made = [make_video(Path(tmp) / f"v{i}.mp4", d, rng)
                for i, d in enumerate(DURATIONS[: args.videos])]
        log(f"made {len(made)} videos, {sum(m.duration_s for m in made) / 60:.1f} min")
        green, red = (0, 200, 0), (200, 0, 0)
        tricks = {
            "green 0.3 s, red to 50 min": timed_video(
                Path(tmp) / "vfr.mkv", [(i / 1000, green) for i in range(300)]
                + [(0.3 + 600 * k, red) for k in range(6)]),
            "3 frames over 3 h 54 min": timed_video(
                Path(tmp) / "hours.mkv", [(0.0, green), (7020.0, red), (14040.0, red)]),
        }
        tallies = measure(made, tricks)
    table = render(tallies, list(tricks))
    print(table)
    if args.out:
        inserts = sum(len(m.inserts) for m in made)
        Path(args.out).write_text(
            f"# Coverage table ({date.today().isoformat()})\n\n"
            f"`{' '.join(sys.argv)}` on {platform.machine()}, {os.cpu_count()} cores (shared), "
            f"{len(made)} generated videos ({', '.join(f'{m.duration_s:.0f}' for m in made)} s; "
            f"{sum(m.duration_s for m in made) / 60:.1f} min in all, {FPS} fps, {W}x{H}), "
            f"{inserts} inserts, seed {args.seed}; run took {time.perf_counter() - t0:.0f} s. "
            "Load time covers everything before the model: probe, the timestamp pass, the "
            "coverage pass (coverage only) and decoding the judged frames, default decoder.\n\n"
            + table)
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
