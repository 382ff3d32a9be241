"""CPU speed table: the engine's layouts, modes, keep ratios, chunk cache and batching side by
side in one run, as ratios against plain transformers `generate()` on the standard prompt.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/speed_cpu.py [--out bench/results/cpu-....md]
    .venv-vllm/bin/python bench/speed_cpu.py --engines transformers,vllm --out ...

With `--engines transformers,vllm` (run it in the environment .ci/vllm-env builds) the same
model, saved to a temporary directory, is also loaded into vLLM's engine, and rows for both
engines under the layouts vLLM runs (sequential, isolated) join the table, one run.

A random Qwen2.5-VL (`--spec small`: the real layout shrunk, see bench/common.py) judges decoded
8-frame 448x448 videos (1,024 video tokens) against policies/safewatch.yaml. Every configuration
runs once to warm up, then `--repeats` times, the repeats interleaved round-robin so that load
from other processes hits every row alike; the table shows medians. Generation (explain mode and
the baseline) is forced to exactly `--new-tokens` tokens. This machine is shared and noisy: read
the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [BENCH, os.path.dirname(BENCH)]   # bench/ helpers; the repo, where not installed

import common as C  # noqa: E402 - bench/ is not a package; run as a script
import step_costs  # noqa: E402

from guardrail.engine import EngineConfig, GuardEngine  # noqa: E402
from guardrail.policy import load_policy  # noqa: E402
from guardrail.video import load_video  # noqa: E402

BASELINE = "plain generate()"


@dataclass
class Case:
    name: str
    run: Callable[[int], list]   # repeat index -> verdicts (or [] / a count) for `videos` videos
    videos: int = 1
    new_tokens: int = 0          # generated tokens each video must have (checked), 0 = none
    external: bool = False       # the model runs outside our hooks (vLLM): no forward counts


def log(msg: str) -> None:
    print(f"[speed_cpu {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def engine_cases(engine: GuardEngine, vllm: GuardEngine, videos) -> list[Case]:
    """Both engines side by side on the layouts vLLM runs, one video and a batch of 8. The
    repeats reuse the same videos, so vLLM's caches across calls (prefix KV keyed by the video,
    encoder outputs, processed inputs) are emptied before every call: a row measures a new
    video, with only the sharing inside one call (a window's categories) left."""
    batch = videos[:8]
    cases = []

    def cold(run: Callable[[int], list]) -> Callable[[int], list]:
        def wrapped(i: int) -> list:
            llm = vllm.adapter.llm
            llm.reset_prefix_cache()
            llm.reset_mm_cache()
            llm.llm_engine.reset_encoder_cache()
            return run(i)
        return wrapped

    for name, eng in (("transformers", engine), ("vllm", vllm)):
        wrap = cold if name == "vllm" else (lambda run: run)
        for layout in ("sequential", "isolated"):
            e = eng.with_config(layout=layout, mode="fast", batch_size=8)
            cases.append(Case(f"{name} {layout} fast", wrap(lambda i, e=e: [e.check(
                videos[i % len(videos)])]), external=name == "vllm"))
            cases.append(Case(f"{name} {layout} fast: check_batch(8)",
                              wrap(lambda i, e=e: e.check_batch(batch)), videos=8,
                              external=name == "vllm"))
    return cases


def load_vllm_twin(model, processor, policies: str, threads: int) -> GuardEngine:
    """The same random model in vLLM's engine (saved to a temporary directory first), on as
    many CPU threads as our runner gets (vLLM binds its own OpenMP threads to cores)."""
    import tempfile

    out = tempfile.mkdtemp(prefix="speed-cpu-vllm-")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0" if threads == 1 else f"0-{threads - 1}")
    return GuardEngine.from_pretrained(out, policies=policies, engine="vllm", layout="sequential",
                                       device="cpu", dtype="fp32",
                                       vllm=dict(max_model_len=8192, enforce_eager=True))


def build_cases(engine: GuardEngine, model, processor, videos, mp4: bytes, n: int) -> list[Case]:
    prompt = C.standard_prompt(processor, engine.policies)

    def one(e: GuardEngine) -> Callable[[int], list]:
        return lambda i: [e.check(videos[i % len(videos)])]

    def cold(e: GuardEngine) -> Callable[[int], list]:
        def run(i: int) -> list:
            e.chunks.clear()
            return [e.check(videos[i % len(videos)])]
        return run

    def generate(i: int) -> list:
        got = C.plain_generate(model, processor, prompt, videos[i % len(videos)], n)
        assert got == n, f"generate() made {got} tokens, not {n}"
        return []

    cases = [Case(BASELINE, generate, new_tokens=n)]
    for mode in ("fast", "explain"):
        for layout in ("sequential", "parallel", "parallel_cached"):
            e = engine.with_config(layout=layout, mode=mode, max_new_tokens=n)
            cases.append(Case(f"{layout} {mode}", one(e), new_tokens=n if mode != "fast" else 0))
    for pruning in ("kv", "pre_prefill"):
        for ratio in (0.5, 0.25, 0.1):
            e = engine.with_config(layout="parallel", keep_ratio=ratio, pruning_mode=pruning)
            cases.append(Case(f"parallel fast keep {ratio} {pruning}", one(e)))
    pc = engine.with_config(layout="parallel_cached")
    cases.append(Case("parallel_cached fast, cache cold", cold(pc)))
    batch = videos[:8]
    cases.append(Case("pc fast warm: 8 videos, check() each", lambda i: [pc.check(v)
                                                                     for v in batch], videos=8))
    b8 = pc.with_config(batch_size=8)
    cases.append(Case("pc fast warm: check_batch(8)", lambda i: b8.check_batch(batch), videos=8))
    ex = engine.with_config(layout="parallel", mode="explain", max_new_tokens=n, batch_size=8)
    cases.append(Case("parallel explain: 8 videos, check() each",
                      lambda i: [ex.check(v) for v in batch], videos=8))
    cases.append(Case("parallel explain: check_batch(8)", lambda i: ex.check_batch(batch),
                      videos=8))

    def decode(i: int) -> list:
        load_video(mp4, engine.config.sampling)
        return []

    cases.append(Case("decode mp4 (8 frames, 448px)", decode))
    return cases


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="small", choices=sorted(C.SPECS))
    ap.add_argument("--new-tokens", type=int, default=32, help="generated tokens (explain, "
                    "generate()); forced exactly")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a "
                    "shared machine)")
    ap.add_argument("--policies", default="policies/safewatch.yaml")
    ap.add_argument("--out", help="also write the table as markdown here")
    ap.add_argument("--engines", default="transformers", help="transformers | "
                    "transformers,vllm (adds both engines' rows; needs vLLM installed)")
    ap.add_argument("--only-engines", action="store_true", help="with --engines: the engine "
                    "rows and the baseline only")
    ap.add_argument("--steps-only", action="store_true", help="only the per-clip and per-step "
                    "costs (vision attention calls, masks), not the speed table")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    processor = C.build_processor()
    model = C.build_model(args.spec, processor.tokenizer, "cpu", torch.float32)
    adapter = C.make_adapter(model, processor, f"random-qwen2.5-vl-{args.spec}")
    meter = C.Meter(model)
    engine = GuardEngine(adapter, load_policy(args.policies), EngineConfig(mode="fast"))
    videos = [C.synthetic_video(seed) for seed in range(8)]
    ragged = [C.synthetic_video(seed, frames=(8, 4)[seed % 2]) for seed in range(8)]
    costs = step_costs.render(engine, videos, ragged)
    if args.steps_only:
        print(costs)
        return 0
    mp4 = C.encode_mp4()
    cases = build_cases(engine, model, processor, videos, mp4, args.new_tokens)
    if args.only_engines:
        cases = cases[:1]
    if "vllm" in args.engines.split(","):
        vllm = load_vllm_twin(model, processor, args.policies, args.threads)
        cases += engine_cases(engine, vllm, videos)
    log(f"model {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params; "
        f"{len(cases)} configurations x (1 warm-up + {args.repeats})")

    counts: dict[str, C.Counts] = {}
    kept: dict[str, str] = {}
    stages: dict[str, dict[str, list[float]]] = {c.name: {} for c in cases}   # ms per video

    def measured(case: Case) -> Callable[[int], None]:
        def run(i: int) -> None:
            before = meter.snapshot()
            verdicts = case.run(i)
            got = meter.counts.minus(before)
            if case.new_tokens and case.name != BASELINE and not case.external:
                steps = got.decode_steps / case.videos
                assert steps == case.new_tokens, f"{case.name}: {steps} tokens generated"
            counts[case.name] = got
            per = {"enc": got.encoder_s * 1e3 / case.videos}
            if verdicts:
                p = verdicts[0].pruning
                kept[case.name] = f"{p.kept_tokens}/{p.total_tokens}"
                for k in ("decode_video", "prefill", "verdict", "generate"):
                    per[k] = sum(getattr(v.timing_ms, k) for v in verdicts) / case.videos
                per["prefill"] -= per["enc"]
            for k, ms in per.items():
                stages[case.name].setdefault(k, []).append(ms)
        return run

    with C.forced_length(adapter):
        times = C.median_times({c.name: measured(c) for c in cases}, args.repeats, "cpu", log=log)
    table = (render(cases, times, counts, kept, stages) + "\n" + costs + "\n## The last two "
             "tables\n\n" + step_costs.__doc__.split("\n\n", 1)[1])
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(header(args, model, time.perf_counter() - t0) + table)
        log(f"wrote {args.out}")
    return 0


def render(cases: list[Case], times, counts, kept, stages) -> str:
    base = C.median(times[BASELINE])
    rows = ["| configuration | LM forwards | LM tokens / video | kept video tokens | ms / video "
            "| videos/s | x generate() | prep | enc | prefill | verdict | generate |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cases:
        per = C.median(times[c.name]) / c.videos
        tokens = counts[c.name].lm_tokens / c.videos if c.name in counts else 0
        model_row = tokens > 0 or c.external
        st = {k: f"{C.median(v):,.0f}" for k, v in stages[c.name].items()} if model_row else {}
        parts = [st.get(k, "-") for k in ("decode_video", "enc", "prefill", "verdict", "generate")]
        calls = counts[c.name].lm_calls if model_row and not c.external else "-"
        rows.append(f"| {c.name} | {calls} | {f'{tokens:,.0f}' if tokens else '-'} "
                    f"| {kept.get(c.name, '-')} | {per * 1e3:,.0f} | {1 / per:.2f} "
                    f"| {f'{base / per:.2f}' if model_row else '-'} | {' | '.join(parts)} |")
    return "\n".join(rows) + "\n"


def header(args, model, seconds: float) -> str:
    import transformers

    params = sum(p.numel() for p in model.parameters()) / 1e6
    return (
        f"# CPU speed table ({date.today().isoformat()})\n\n"
        f"`{' '.join(sys.argv)}` on {platform.machine()}, {os.cpu_count()} cores (shared with "
        f"other jobs), torch {torch.__version__} with {args.threads} thread(s), transformers "
        f"{transformers.__version__}. Random Qwen2.5-VL `{args.spec}` ({params:.1f}M params, "
        f"fp32), 8 frames of 448x448 (1,024 video tokens), policies `{args.policies}`, "
        f"{args.new_tokens} generated tokens where generating (forced), median of "
        f"{args.repeats} interleaved repeats after one warm-up; run took {seconds:.0f} s. "
        "`x generate()`: plain generate() time / row time (higher is faster). "
        "`LM forwards`: language-model forward calls per row's run (all its videos). "
        "`LM tokens`: language-model token positions run (padding included). "
        "Stage columns, ms per video (medians): `prep` = processor + rope index "
        "(timing_ms.decode_video; videos are pre-decoded), `enc` = visual encoder (hook), "
        "`prefill` = timing_ms.prefill minus enc, `verdict`, `generate` from timing_ms. "
        "`pc` = parallel_cached. The last two tables are explained under them.\n\n")


if __name__ == "__main__":
    raise SystemExit(main())
