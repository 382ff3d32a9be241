"""Parity checks for the first run on a GPU, before the speed scripts: the paths that only a
GPU takes (varlen vision attention, CUDA sdpa with additive masks, bf16 kernels, flex block
masks, non-blocking copies) against the paths the CPU test suite checks, each as a max
difference with a pass/fail line.

    python bench/gpu_parity.py                 # one GPU (cuda:0): about a minute
    python bench/gpu_parity.py --small         # the same checks on the CPU (CI runs this)

Models: tiny random ones written by `guardrail model make-tiny` (no download), loaded through
the real loading path (`GuardEngine.from_pretrained`). Videos: two synthetic clips of different
sizes (ragged rows), decoded once. Checks:

- vision: our one-call vision tower against transformers' per-piece tower (fp32).
- ragged: a batch of the two clips against each clip judged alone (scores).
- explain: batched explain against single explain (text identical, scores).
- bf16: bf16 weights against fp32 (scores; the CPU suite's measured bound).
- flex: the FlexAttention block-mask backend against sdpa (scores; skipped where flex is not
  available).
- resize: InternVL's frame resize as tensor math on the device against Pillow (must be equal).
- fold: masked decode attention with the query heads folded per key/value head (no K/V copy)
  against sdpa over repeated K/V, at Qwen2.5-VL-7B's head counts, ragged rows.

Prints one table (markdown) to stdout; exit 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(BENCH)]   # the repo, where not installed

from guardrail.console import quiet_transformers  # noqa: E402
from guardrail.engine import GuardEngine  # noqa: E402
from guardrail.tiny import make_tiny  # noqa: E402
from guardrail.video import SamplingConfig, load_video  # noqa: E402

FP32_TOL = 1e-4        # same math, other kernels or batch shapes
BF16_TOL = 0.03        # tests/test_batches.py: bf16 moved tiny-model scores by at most 0.0114


def log(msg: str) -> None:
    print(f"[gpu_parity {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def clips(tmp: Path) -> list:
    """Two clips whose windows give different token counts (8 frames of 64x48, 4 of 160x128)."""
    import io

    import av
    import numpy as np

    out = []
    for name, (w, h, n) in {"small": (64, 48, 8), "large": (160, 128, 4)}.items():
        buf = io.BytesIO()
        with av.open(buf, "w", format="mp4") as container:
            stream = container.add_stream("h264", rate=10)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            rng = np.random.default_rng(len(out))
            for _ in range(30):
                frame = rng.integers(0, 255, (h, w, 3), np.uint8)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, "rgb24")))
            container.mux(stream.encode(None))
        path = tmp / f"{name}.mp4"
        path.write_bytes(buf.getvalue())
        out.append(load_video(path, SamplingConfig(num_frames=n)))
    return out


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max())


def check_vision(model: Path, device: str, videos: list) -> float:
    from transformers import AutoModelForImageTextToText

    engine = GuardEngine.from_pretrained(model, device=device)
    adapter = engine.adapter
    plain = AutoModelForImageTextToText.from_pretrained(
        model, dtype=torch.float32, attn_implementation="sdpa").to(device).eval()
    inputs = [adapter.video_inputs(v.clips[0]) for v in videos]
    pixels = torch.cat([i.encoder_inputs["pixel_values_videos"] for i in inputs]).to(device)
    grid = torch.cat([i.encoder_inputs["video_grid_thw"] for i in inputs]).to(device)
    with torch.inference_mode():
        ours = adapter.model.model.get_video_features(pixels, grid, return_dict=True)
        theirs = plain.model.get_video_features(pixels, grid, return_dict=True)
    return max_diff(_cat(ours.pooler_output), _cat(theirs.pooler_output))


def _cat(x) -> torch.Tensor:
    return torch.cat(list(x)) if isinstance(x, (list, tuple)) else x


def check_ragged(model: Path, device: str, videos: list) -> float:
    engine = GuardEngine.from_pretrained(model, device=device, layout="parallel")
    rows, _ = engine.judge([v.clips[0] for v in videos])
    assert rows[0].total_tokens != rows[1].total_tokens, "the rows are not ragged"
    return max(max_diff(row.scores, engine.judge([v.clips[0]])[0][0].scores)
               for row, v in zip(rows, videos, strict=True))


def check_explain(model: Path, device: str, videos: list) -> float:
    engine = GuardEngine.from_pretrained(model, device=device, mode="explain",
                                         max_new_tokens=16)
    batched = engine.check_batch(videos)
    worst = 0.0
    for video, got in zip(videos, batched, strict=True):
        alone = engine.check(video)
        if (got.description, got.explanation) != (alone.description, alone.explanation):
            return float("inf")                  # texts differ: fails whatever the scores
        worst = max(worst, max(abs(a.score - b.score)
                               for a, b in zip(got.categories, alone.categories, strict=True)))
    return worst


def check_bf16(model: Path, device: str, videos: list) -> float:
    clip = videos[0].clips[0]
    fp32 = GuardEngine.from_pretrained(model, device=device, keep_ratio=0.5)
    bf16 = GuardEngine.from_pretrained(model, device=device, keep_ratio=0.5, dtype="bf16")
    a, b = fp32.judge([clip])[0][0], bf16.judge([clip])[0][0]
    if a.kept_tokens != b.kept_tokens:
        return float("inf")                      # pruning kept other tokens
    return max_diff(a.scores, b.scores)


def check_flex(model: Path, device: str, videos: list) -> float | None:
    try:
        from torch.nn.attention.flex_attention import create_block_mask  # noqa: F401
    except ImportError:
        return None
    clip = videos[0].clips[0]
    sdpa = GuardEngine.from_pretrained(model, device=device, keep_ratio=0.5)
    flex = GuardEngine.from_pretrained(model, device=device, keep_ratio=0.5,
                                       attn="flex_attention")
    a, b = sdpa.judge([clip])[0][0], flex.judge([clip])[0][0]
    if a.kept_tokens != b.kept_tokens:
        return float("inf")
    return max_diff(a.scores, b.scores)


def check_resize(model: Path, device: str, videos: list) -> float:
    """InternVL's Pillow resize as tensor math on the device against Pillow (uint8 levels)."""
    import numpy as np
    from PIL import Image

    from guardrail.video.resize import exact, resize_like_pillow

    rng = np.random.default_rng(0)
    worst = 0.0
    for (h, w), size in (((480, 640), (448, 448)), ((640, 360), (448, 448)),
                         ((1920, 1080), (448, 448)), ((37, 53), (20, 31))):
        if not exact(h, w, size, device):
            return float("inf")                  # no pass order reproduces this Pillow
        frames = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        got = resize_like_pillow(torch.from_numpy(frames).to(device), size)
        want = np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BICUBIC))
                         for f in frames])
        worst = max(worst, max_diff(got.permute(0, 2, 3, 1).cpu(), torch.from_numpy(want)))
    return worst


def check_fold(model: Path, device: str, videos: list) -> float:
    """Masked decode attention with query heads folded per key/value head (no K/V copy)
    against sdpa over K/V repeated per head, ragged rows, on the device's kernels."""
    from transformers.integrations.sdpa_attention import repeat_kv

    from guardrail.adapters.attention import folded_sdpa
    from guardrail.layout import additive_mask

    g = torch.Generator(device="cpu").manual_seed(0)
    b, h, h_kv, k_len, d = 4, 28, 4, 3000, 128           # Qwen2.5-VL-7B's heads
    worst = 0.0
    for n in (1, 24):
        q = torch.randn(b, h, n, d, generator=g).to(device)
        k, v = (torch.randn(b, h_kv, k_len, d, generator=g).to(device) for _ in range(2))
        ends = torch.tensor([1200, 3000, 2500, 2999], device=device)[:, None, None]
        cols = torch.arange(k_len, device=device)[None, None]
        own = torch.arange(n, device=device)[None, :, None] + ends - n
        mask = additive_mask((cols < ends) & (cols <= own), torch.float32)
        got, _ = folded_sdpa(q, k, v, mask, d ** -0.5)
        want = torch.nn.functional.scaled_dot_product_attention(
            q, repeat_kv(k, h // h_kv), repeat_kv(v, h // h_kv), attn_mask=mask,
            scale=d ** -0.5).transpose(1, 2)
        worst = max(worst, max_diff(got, want))
    return worst


CHECKS: list[tuple[str, Callable, float, str]] = [
    ("vision", check_vision, FP32_TOL, "one-call vision tower vs transformers' per piece"),
    ("ragged", check_ragged, FP32_TOL, "batch of two sizes vs each alone (scores)"),
    ("explain", check_explain, FP32_TOL, "batched vs single explain (text equal, scores)"),
    ("bf16", check_bf16, BF16_TOL, "bf16 vs fp32 weights (scores, keep_ratio 0.5)"),
    ("flex", check_flex, FP32_TOL, "FlexAttention block masks vs sdpa (scores)"),
    ("resize", check_resize, 0.0, "InternVL's Pillow resize on the device vs Pillow (levels)"),
    ("fold", check_fold, FP32_TOL, "decode attention, heads folded vs K/V repeated (7B heads)"),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="run on the CPU (CI)")
    ap.add_argument("--device", default=None, help="default: cuda, or cpu with --small")
    ap.add_argument("--family", default="qwen2_5_vl", help="a make-tiny family")
    ap.add_argument("--only", default="", help="comma-separated check names")
    args = ap.parse_args(argv)
    device = args.device or ("cpu" if args.small else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run with --small for the CPU", file=sys.stderr)
        return 2
    if device.startswith("cuda"):      # fp32 comparisons in real fp32, not TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    quiet_transformers()
    wanted = {n for n in args.only.split(",") if n}
    rows, failed = [], False
    with tempfile.TemporaryDirectory(prefix="gpu-parity-") as tmp:
        model = make_tiny(Path(tmp) / "model", args.family)
        videos = clips(Path(tmp))
        for name, check, tol, what in CHECKS:
            if wanted and name not in wanted:
                continue
            log(f"{name}: {what}")
            t0 = time.perf_counter()
            try:
                diff = check(model, device, videos)
            except Exception as err:  # noqa: BLE001 - a failing check is reported, not fatal
                traceback.print_exc()
                rows.append((name, what, "error", f"{tol:g}",
                             f"FAIL ({type(err).__name__})", time.perf_counter() - t0))
                failed = True
                continue
            if diff is None:
                result, shown = "skipped (not available)", "-"
            else:
                ok = diff <= tol
                failed |= not ok
                result, shown = ("pass" if ok else "FAIL"), f"{diff:.2e}"
            rows.append((name, what, shown, f"{tol:g}", result, time.perf_counter() - t0))
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
    print(f"gpu_parity on {name} ({device}), torch {torch.__version__}, family {args.family}\n")
    print("| check | what | max diff | tolerance | result | s |")
    print("|---|---|---:|---:|---|---:|")
    for check_name, what, diff, tol, result, seconds in rows:
        print(f"| {check_name} | {what} | {diff} | {tol} | {result} | {seconds:.1f} |")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
