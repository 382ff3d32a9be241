"""`guardrail bench run` with decoding overlapped (groups decoded ahead of the model on other
threads) against decoding serially, over the same videos: wall time and the share of it the
model spent waiting for decoded videos.

    .venv/bin/python bench/pipeline_cpu.py [--videos 32] [--batch 4] [--model DIR] [--repeats 2]

Videos: `--videos` synthetic H.264 clips (10 s, 320x240, 24 fps, a keyframe every 48 frames),
8 uniformly sampled frames each; model: a tiny random Qwen2.5-VL (`make-tiny`) unless `--model`
names one. Runs alternate (serial, overlapped, serial, ...) so the machine's load hits both
alike; each run starts from an empty output folder. Prints one markdown table.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(BENCH)]   # the repo, where not installed

from guardrail.bench.datasets import load_dataset  # noqa: E402
from guardrail.bench.runner import EngineSpec, run  # noqa: E402
from guardrail.console import quiet_transformers  # noqa: E402
from guardrail.engine import DEFAULT_POLICY  # noqa: E402
from guardrail.policy import load_policies  # noqa: E402
from guardrail.tiny import make_tiny  # noqa: E402
from guardrail.video import SamplingConfig  # noqa: E402


def clip(seed: int, seconds: float = 10.0, fps: int = 24, size: tuple[int, int] = (320, 240)
         ) -> bytes:
    import av
    import numpy as np

    rng = np.random.default_rng(seed)
    w, h = size
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("h264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.gop_size = 48
        base = rng.integers(0, 255, (h, w, 3), np.uint8)
        for i in range(int(seconds * fps)):
            frame = np.roll(base, i * 3, axis=1)            # motion: real inter-frame work
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, "rgb24")))
        out.mux(stream.encode(None))
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4, help="videos per engine call")
    ap.add_argument("--model", default=None)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    quiet_transformers()
    rows: dict[str, list[tuple[float, float]]] = {"serial": [], "overlapped": []}
    with tempfile.TemporaryDirectory(prefix="pipeline-") as tmp:
        root = Path(tmp)
        model = args.model or str(make_tiny(root / "model", "qwen2_5_vl"))
        lines = []
        for i in range(args.videos):
            (root / f"v{i}.mp4").write_bytes(clip(i))
            lines.append(f'{{"video": "v{i}.mp4", "labels": []}}')
        (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
        data = load_dataset(root / "manifest.jsonl")
        spec = EngineSpec(model, load_policies([DEFAULT_POLICY]), "cpu", "auto", (
            ("sampling", SamplingConfig(mode="uniform", num_frames=8)),), "transformers", ())
        for k in range(args.repeats):
            for name, ahead in (("serial", 0), ("overlapped", 2)):
                out = root / f"out-{name}-{k}"
                t0 = time.perf_counter()
                result = run(data, spec, out, batch=args.batch, prefetch=ahead)
                wall = time.perf_counter() - t0
                print(f"{name} run {k + 1}: {result.elapsed_s:.1f} s judging "
                      f"({wall:.1f} s with the engine load), waited {result.input_wait_s:.1f} s",
                      file=sys.stderr)
                rows[name].append((result.elapsed_s, result.input_wait_s or 0.0))
    print(f"bench run over {args.videos} videos (10 s, 320x240 H.264, 8 frames each), "
          f"batch {args.batch}, median of {args.repeats}, cpu_count {os.cpu_count()}\n")
    print("| decoding | judging wall s | model waits for input s | share waiting | "
          "videos / s |")
    print("|---|---:|---:|---:|---:|")
    for name, runs in rows.items():
        wall = statistics.median(w for w, _ in runs)
        wait = statistics.median(x for _, x in runs)
        print(f"| {name} | {wall:.1f} | {wait:.1f} | {wait / wall:.0%} | "
              f"{args.videos / wall:.2f} |")
    serial = statistics.median(w for w, _ in rows["serial"])
    overlapped = statistics.median(w for w, _ in rows["overlapped"])
    print(f"\noverlapped / serial wall time: {overlapped / serial:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
