"""Explain-mode decoding on the CPU, this checkout's runner against an older checkout's: the
time the batch spends decoding answer text, for rows in step (8 equal videos) and ragged rows
(two video sizes alternating), and whether both checkouts wrote the same text.

    .venv/bin/python bench/decode_cpu.py --before <checkout of an older commit> [--runs 3]

The model is the tiny random Qwen2.5-VL with a wider, deeper text model (8 layers, hidden 512,
8 query heads over 2 key/value heads, head_dim 64, ~25 M parameters); with the shipped policies
a window's prompt is ~1,850 tokens, so a batch of 8 holds ~120 MB of KV cache, which a growing
cache copied whole at every decode step. Each measurement runs in a fresh interpreter with the
checkout's `guardrail` first on the path; the checkouts alternate, so the machine's load hits
both alike. Prints one markdown table (median of the runs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
CHILD = """
import hashlib, json, resource, sys, time
from guardrail.console import quiet_transformers
from guardrail.engine import GuardEngine
from guardrail.video import load_video
quiet_transformers()
model, paths, tokens = sys.argv[1], sys.argv[2:-1], int(sys.argv[-1])
eng = GuardEngine.from_pretrained(model, mode="explain", max_new_tokens=tokens, batch_size=8)
videos = [load_video(p) for p in paths]
eng.check_batch(videos[:2])                                  # warm: lazy imports, chunk cache
t0 = time.perf_counter()
verdicts = eng.check_batch(videos)
wall = time.perf_counter() - t0
text = hashlib.sha256("".join(v.description + v.explanation for v in verdicts).encode())
print(json.dumps({"decode_s": sum(v.timing_ms.generate for v in verdicts) / 1e3,
                  "wall_s": wall, "text": text.hexdigest()[:12],
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def widened_model(out: Path) -> Path:
    """The tiny Qwen2.5-VL with a wider, deeper text model (random weights, marked as a test
    model like every tiny one)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from guardrail.tiny import make_tiny, mark_test_model

    tiny = make_tiny(out / "tiny", "qwen2_5_vl")
    config = AutoConfig.from_pretrained(tiny)
    text = config.get_text_config()
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = 512, 1536, 8
    text.num_attention_heads, text.num_key_value_heads = 8, 2
    text.layer_types = ["full_attention"] * text.num_hidden_layers
    config.vision_config.out_hidden_size = 512
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    mark_test_model(model)
    wide = out / "wide"
    shutil.copytree(tiny, wide)
    model.save_pretrained(wide, safe_serialization=True)
    return wide


def measure(tree: Path, model: Path, videos: list[Path], tokens: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    got = subprocess.run([sys.executable, "-c", CHILD, str(model), *map(str, videos),
                          str(tokens)], cwd=tree, env=env, capture_output=True, text=True,
                         timeout=900)
    if got.returncode:
        raise SystemExit(f"{tree}: {got.stderr[-2000:]}")
    return json.loads(got.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True, help="an older checkout")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=48, help="max_new_tokens")
    args = ap.parse_args(argv)
    sys.path[:0] = [str(BENCH), str(ROOT)]
    from pipeline_cpu import clip

    from guardrail.console import quiet_transformers

    quiet_transformers()
    trees = {"before": args.before.resolve(), "this": ROOT}
    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="decode-") as tmp:
        root = Path(tmp)
        model = widened_model(root)
        small = [root / f"s{i}.mp4" for i in range(8)]
        large = [root / f"l{i}.mp4" for i in range(4)]
        for i, p in enumerate(small):
            p.write_bytes(clip(i, seconds=3.0))
        for i, p in enumerate(large):
            p.write_bytes(clip(100 + i, seconds=3.0, size=(480, 360)))
        cases = {"rows in step (8 equal videos)": small,
                 "ragged rows (2 sizes alternating)": [v for pair in zip(small[:4], large,
                                                                          strict=True)
                                                        for v in pair]}
        for run in range(args.runs):
            for case, videos in cases.items():
                for name, tree in trees.items():
                    r = measure(tree, model, videos, args.tokens)
                    results.setdefault((case, name), []).append(r)
                    print(f"run {run + 1} {case} {name}: decode {r['decode_s']:.2f} s, "
                          f"text {r['text']}", file=sys.stderr)
    print(f"explain mode, batch of 8, max_new_tokens {args.tokens}, median of {args.runs} "
          f"runs, cpu_count {os.cpu_count()}\n")
    print("| rows | checkout | decoding s | check_batch s | peak RSS MB | text |")
    print("|---|---|---:|---:|---:|---|")
    for (case, name), runs in results.items():
        texts = {r["text"] for r in runs}
        print(f"| {case} | {name} | {statistics.median(r['decode_s'] for r in runs):.2f} | "
              f"{statistics.median(r['wall_s'] for r in runs):.2f} | "
              f"{statistics.median(r['rss_mb'] for r in runs):,.0f} | "
              f"{'/'.join(sorted(texts))} |")
    for case in cases:
        before = statistics.median(r["decode_s"] for r in results[(case, "before")])
        this = statistics.median(r["decode_s"] for r in results[(case, "this")])
        print(f"\n{case}: decoding this / before = {this / before:.2f}", end="")
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
