"""Qwen2.5-VL-7B on one GPU: the engine's paths against plain transformers `generate()`.

    python bench/gpu_qwen25_7b.py [--out $OUT/gpu.md]   # one H100: ~3-5 min, hard stop 7.5 min
    python bench/gpu_qwen25_7b.py --small               # same code, CPU, scaled-down model
    python bench/gpu_qwen25_7b.py --engine vllm         # a GPU machine with vLLM installed

`--engine vllm` compares the engines instead: the baseline, our runner's isolated and
parallel_cached rows, and vLLM's engine (the same architecture with vLLM's own random weights,
`load_format=dummy`, from a config written to a temporary directory) on sequential and isolated,
single videos and batches. The lent GPU image has no vLLM: there it exits 2 saying so.

No download, no internet: Qwen2.5-VL-7B-Instruct's architecture (bench/common.py SPECS["7b"])
with random bf16 weights created on the GPU, the bench processor, decoded 8-frame 448x448
videos (1,024 video tokens each), SafeWatch's six policies. Sections run most important first,
each under a time estimate; a global deadline (counted from process start) skips what no longer
fits and says so; a failing section is reported and the rest still run. Progress goes to stderr,
one table to stdout. Self-checks: the parameter count of the real model, 1,024 video tokens per
clip, finite scores in [0, 1], exactly 256 generated tokens where generating, kept-token ratios.

Throughput is videos / wall time of `check_batch` (or `check`) over pre-decoded videos; stage
columns are per video from `Verdict.timing_ms` (`prep` = the processor; `enc` = the visual encoder,
timed by a hook; `prefill` = the rest of timing_ms.prefill). CUDA is synchronised after every
language-model and encoder forward so those host-clock stages are honest.
"""

from __future__ import annotations

import argparse
import faulthandler
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [BENCH, os.path.dirname(BENCH)]   # bench/ helpers; the repo, where not installed

import common as C  # noqa: E402 - bench/ is not a package; run as a script

from guardrail.engine import EngineConfig, GuardEngine  # noqa: E402
from guardrail.policy import load_policy  # noqa: E402
from guardrail.video import load_video  # noqa: E402

QWEN25_VL_7B_PARAMS = 8_292_166_656
NEW_TOKENS = 256           # SafeWatch's setting (--small: 16)
TARGET_VPS, TARGET_X = 15.0, 30.0


def log(msg: str) -> None:
    print(f"[gpu_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def process_age_s() -> float:
    """Seconds since this process started (imports included); 0 where /proc is missing."""
    try:
        with open("/proc/self/stat") as f:
            start = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as f:
            return float(f.read().split()[0]) - start
    except (OSError, ValueError, IndexError):
        return 0.0


@dataclass
class Row:
    name: str
    videos: int = 0
    seconds: list[float] = field(default_factory=list)   # per timed call
    per_call: int = 1                                     # videos per timed call
    new_tokens: int = 0
    counts: C.Counts = field(default_factory=C.Counts)
    stages: dict[str, float] = field(default_factory=dict)   # ms summed over timed videos
    kept: str = "-"
    note: str = ""
    role: str = ""                                        # "baseline" | "target" | ""

    @property
    def per_video_s(self) -> float:
        return C.median(self.seconds) / self.per_call if self.seconds else math.nan


class Bench:
    def __init__(self, args):
        self.args = args
        self.small = args.small
        self.device = torch.device("cpu" if args.small else "cuda")
        self.budget = args.budget_s
        self.new_tokens = 16 if args.small else NEW_TOKENS
        self.batches = (2, 4) if args.small else (8, 16)
        dtype = torch.float32 if args.small else torch.bfloat16
        self.processor = C.build_processor()
        t = time.perf_counter()
        self.model = C.build_model("small" if args.small else "7b", self.processor.tokenizer,
                                   self.device, dtype, attn=args.attn)
        n = sum(p.numel() for p in self.model.parameters())
        log(f"built model in {time.perf_counter() - t:.1f} s: {n:,} params, {dtype}, "
            f"{self.device}")
        if not args.small:
            assert n == QWEN25_VL_7B_PARAMS, f"{n:,} params, Qwen2.5-VL-7B has 8,292,166,656"
        self.adapter = C.make_adapter(self.model, self.processor,
                                      "random-Qwen2.5-VL-" + ("small" if args.small else "7B"),
                                      args.attn)
        self.meter = C.Meter(self.model, sync=True, pairs=True)
        self.engine = GuardEngine(self.adapter, load_policy(args.policies),
                                  EngineConfig(mode="fast", max_new_tokens=self.new_tokens))
        self.prompt = C.standard_prompt(self.processor, self.engine.policies)
        self.pool = [C.synthetic_video(seed) for seed in range(32 if not args.small else 16)]
        self.next = 0

    def left(self) -> float:
        return self.budget - process_age_s()

    def videos(self, k: int) -> list:
        out = [self.pool[(self.next + i) % len(self.pool)] for i in range(k)]
        self.next += k
        return out

    # ---------------------------------------------------------------- measurements

    def engine_row(self, name: str, calls: int, batch: int = 1, cold: bool = False,
                   new_tokens: int = 0, **changes) -> Row:
        e = self.engine.with_config(batch_size=batch, **changes)
        row = Row(name, per_call=batch, new_tokens=new_tokens)
        warm = e.with_config(max_new_tokens=8) if new_tokens else e
        if cold:
            e.chunks.clear()
        warm.check_batch(self.videos(batch))
        for r in range(calls):
            if r and self.left() < 30:
                row.note = f"deadline: {r} of {calls} timed calls"
                break
            vs = self.videos(batch)
            if cold:
                e.chunks.clear()
            before = self.meter.snapshot()
            C.sync(self.device)
            t = time.perf_counter()
            verdicts = e.check_batch(vs)
            C.sync(self.device)
            row.seconds.append(time.perf_counter() - t)
            got = self.meter.counts.minus(before)
            self._check(name, verdicts, got, batch, new_tokens)
            self._add(row, got, batch)
            for v in verdicts:
                for k, ms in v.timing_ms.model_dump().items():
                    row.stages[k] = row.stages.get(k, 0.0) + ms
            p = verdicts[0].pruning
            row.kept = f"{p.kept_tokens}/{p.total_tokens}"
        return row

    def vllm_row(self, name: str, calls: int, batch: int = 1, **changes) -> Row:
        """check_batch on vLLM's engine (no hooks inside it: wall time and scores only)."""
        e = self.vllm_engine().with_config(batch_size=batch, **changes)
        row = Row(name, per_call=batch)
        e.check_batch(self.videos(batch))
        for r in range(calls):
            if r and self.left() < 30:
                row.note = f"deadline: {r} of {calls} timed calls"
                break
            t = time.perf_counter()
            verdicts = e.check_batch(self.videos(batch))
            row.seconds.append(time.perf_counter() - t)
            row.videos += batch
            scores = [c.score for v in verdicts for c in v.categories]
            assert all(0.0 <= x <= 1.0 for x in scores), f"{name}: scores out of [0, 1]"
            for v in verdicts:
                for k, ms in v.timing_ms.model_dump().items():
                    row.stages[k] = row.stages.get(k, 0.0) + ms
        return row

    def vllm_engine(self) -> GuardEngine:
        if getattr(self, "_vllm", None) is None:
            import tempfile

            out = tempfile.mkdtemp(prefix="gpu-bench-vllm-")
            self.model.config.save_pretrained(out)
            self.processor.save_pretrained(out)
            t = time.perf_counter()
            self._vllm = GuardEngine.from_pretrained(
                out, policies=self.engine.policies, engine="vllm", layout="isolated",
                dtype="fp32" if self.small else "bf16",
                vllm=dict(load_format="dummy", max_model_len=8192,
                          **({"enforce_eager": True} if self.small else
                             {"gpu_memory_utilization": 0.45})))
            log(f"vLLM engine ready in {time.perf_counter() - t:.0f} s")
        return self._vllm

    def generate_row(self, name: str, calls: int) -> Row:
        row, n_new = Row(name, new_tokens=self.new_tokens), self.new_tokens
        C.plain_generate(self.model, self.processor, self.prompt, self.videos(1)[0], 8)
        for r in range(calls):
            if r and self.left() < 45:
                row.note = f"deadline: {r} of {calls} timed calls"
                break
            before = self.meter.snapshot()
            C.sync(self.device)
            t = time.perf_counter()
            got_tokens = C.plain_generate(self.model, self.processor, self.prompt,
                                          self.videos(1)[0], n_new)
            C.sync(self.device)
            row.seconds.append(time.perf_counter() - t)
            assert got_tokens == n_new, f"generate() made {got_tokens} tokens, not {n_new}"
            self._add(row, self.meter.counts.minus(before), 1)
        return row

    def decode_row(self, name: str, calls: int) -> Row:
        mp4 = C.encode_mp4()
        row = Row(name)
        load_video(mp4, self.engine.config.sampling)
        for _ in range(calls):
            t = time.perf_counter()
            video = load_video(mp4, self.engine.config.sampling)
            row.seconds.append(time.perf_counter() - t)
            row.videos += 1
        assert video.clips[0].frames.shape == (8, C.FRAME_PX, C.FRAME_PX, 3), "decoded shape"
        return row

    def _add(self, row: Row, got: C.Counts, videos: int) -> None:
        row.videos += videos
        row.counts = C.Counts(**{k: getattr(row.counts, k) + v for k, v in got.__dict__.items()})

    def _check(self, name: str, verdicts, got: C.Counts, batch: int, new_tokens: int) -> None:
        assert len(verdicts) == batch, f"{name}: {len(verdicts)} verdicts for {batch} videos"
        for v in verdicts:
            scores = [c.score for c in v.categories]
            assert all(0.0 <= s <= 1.0 for s in scores), f"{name}: scores {scores}"
            assert v.pruning.total_tokens == 1024, f"{name}: {v.pruning.total_tokens} video tokens"
        self._check_tokens(name, verdicts, got, batch, new_tokens)

    @staticmethod
    def _check_tokens(name: str, verdicts, got: C.Counts, batch: int, new_tokens: int) -> None:
        if new_tokens and batch == 1:
            assert got.decode_steps == new_tokens, (
                f"{name}: {got.decode_steps} tokens generated, not {new_tokens}")
        elif new_tokens:    # rows decode together: one forward per token for the whole batch
            assert all(v.description is not None for v in verdicts), f"{name}: no text"
            assert got.lm_calls <= new_tokens + 8, (
                f"{name}: {got.lm_calls} forwards for a batch of {batch}")

    # ---------------------------------------------------------------- checks and peak

    def peak_tflops(self) -> float:
        """The card's matmul ceiling: n^3 products on random data, 3 warm-ups, then the median
        of 5 timings of 10 back-to-back products (synchronised host clock)."""
        n, dt = (8192, torch.bfloat16) if not self.small else (512, torch.float32)
        a, b = (torch.randn(n, n, device=self.device, dtype=dt) for _ in range(2))
        for _ in range(3):
            a @ b
        times = []
        for _ in range(5):
            C.sync(self.device)
            t = time.perf_counter()
            for _ in range(10):
                a @ b
            C.sync(self.device)
            times.append((time.perf_counter() - t) / 10)
        del a, b
        return 2 * n ** 3 / C.median(times) / 1e12

    def invariants(self) -> str:
        """Prompt size and quick agreement checks (not asserted: bf16 kernels differ by
        shape), on the first videos, which also warms the chunk cache."""
        v0, v1 = self.pool[0], self.pool[1]
        pc = self.engine.with_config(layout="parallel_cached")
        pc.chunks.clear()
        cold = pc.check(v0).scores()
        warm = pc.check(v0).scores()
        batched = pc.with_config(batch_size=2).check_batch([v0, v1])[0].scores()
        d_cache = max(abs(cold[k] - warm[k]) for k in cold)
        d_batch = max(abs(warm[k] - batched[k]) for k in warm)
        video = self.adapter.video_inputs(v0.clips[0])
        assert video.num_visual == 1024, f"{video.num_visual} video tokens per clip, not 1,024"
        lay, _ = pc.layout(video)
        return (f"prompt {lay.length:,} tokens incl. 1,024 video + probes, of which "
                f"{lay.span('V').start:,} (S + policy chunks) cached under parallel_cached; "
                f"max |score diff| ({str(self.adapter.dtype)[6:]}, not asserted): warm vs "
                f"cold cache {d_cache:.1e}, "
                f"batched vs single {d_batch:.1e}")


def sections(b: Bench) -> list[tuple[str, int, float, str, Callable[[], Row]]]:
    """(name, run order, estimated seconds on an H100, role, run), in table order. The run
    order puts the target rows and the baseline first, so a deadline cuts the least important."""
    small, n, (b8, b16) = b.small, b.new_tokens, b.batches
    n_b = 2 if small else 4          # timed batches
    n_1 = 2 if small else 6          # timed single videos
    n_g = 1 if small else 2          # timed generations of `n` tokens
    pc = dict(layout="parallel_cached")
    gen = dict(mode="explain", new_tokens=n)
    pre = dict(keep_ratio=0.25, pruning_mode="pre_prefill")
    rows = [
        (f"plain generate() {n} tok", 1, 50, "baseline", lambda r: b.generate_row(r, n_g)),
        (f"sequential+explain {n} tok", 4, 50, "",
         lambda r: b.engine_row(r, n_g, layout="sequential", **gen)),
        (f"parallel+explain {n} tok b{b8}", 12, 40, "",
         lambda r: b.engine_row(r, n_g, b8, layout="parallel", **gen)),
        ("sequential+fast b1", 8, 10, "", lambda r: b.engine_row(r, n_1, layout="sequential")),
        ("parallel+fast b1", 3, 10, "", lambda r: b.engine_row(r, n_1)),
        ("parallel+fast b1 keep.25 kv", 6, 10, "",
         lambda r: b.engine_row(r, n_1, keep_ratio=0.25)),
        ("parallel+fast b1 keep.25 pre_prefill", 7, 10, "",
         lambda r: b.engine_row(r, n_1, **pre)),
        ("pc+fast cold b1", 9, 10, "", lambda r: b.engine_row(r, n_1, cold=True, **pc)),
        ("pc+fast warm b1", 10, 10, "", lambda r: b.engine_row(r, n_1, **pc)),
        (f"pc+fast warm b{b8}", 2, 15, "target", lambda r: b.engine_row(r, n_b, b8, **pc)),
        (f"pc+fast warm b{b16}", 0, 25, "target", lambda r: b.engine_row(r, n_b, b16, **pc)),
        (f"pc+fast warm b{b16} keep.25 pre_prefill", 5, 25, "",
         lambda r: b.engine_row(r, n_b, b16, **pre, **pc)),
        ("decode mp4 (CPU, 8 frames)", 11, 10, "", lambda r: b.decode_row(r, 3)),
    ]
    if b.args.engine == "vllm":
        keep = {f"plain generate() {n} tok", f"pc+fast warm b{b8}"}
        rows = [r for r in rows if r[0] in keep] + [
            (f"isolated+fast b{b8}", 2, 15, "", lambda r: b.engine_row(r, n_b, b8,
                                                                      layout="isolated")),
            ("vllm load (not timed)", 3, 150, "", lambda r: Row(r, note="loaded")
             if b.vllm_engine() else None),
            ("vllm sequential+fast b1", 4, 15, "",
             lambda r: b.vllm_row(r, n_1, layout="sequential")),
            ("vllm isolated+fast b1", 5, 15, "", lambda r: b.vllm_row(r, n_1)),
            (f"vllm isolated+fast b{b8}", 6, 20, "target", lambda r: b.vllm_row(r, n_b, b8)),
            (f"vllm isolated+fast b{b16}", 7, 30, "target", lambda r: b.vllm_row(r, n_b, b16)),
        ]
    return [(name, order, est, role, lambda run=run, name=name: run(name))
            for name, order, est, role, run in rows]


FLOPS_NOTE = (
    "FLOPs per video, counted from what ran (hooks on the model): language model "
    "2*P_layers*N_tokens + 4*L*(H*d)*N_visible_pairs + 2*D*V*N_lm_head_rows; vision encoder "
    "2*P_vit*N_patches + 2*P_merger*N_patches/4 + 4*D_vit*sum_layers(window or frame length)"
    "*N_patches; N_tokens includes padding, pairs are the mask's visible (query, key) pairs "
    "(causal for generate()).")


def run_all(b: Bench) -> dict[str, Row]:
    rows: dict[str, Row] = {}
    plan = sections(b)
    for name, _, est, role, run in sorted(plan, key=lambda s: s[1]):
        if b.left() < est:
            rows[name] = Row(name, role=role, note=f"SKIPPED: global deadline ({b.left():.0f} s "
                                                   f"left, section needs ~{est:.0f} s)")
            log(rows[name].note + f": {name}")
            continue
        log(f"section {name} ({b.left():.0f} s left)")
        try:
            rows[name] = r = run()
            r.role = role
            log(f"  {name}: {r.videos} videos, {r.per_video_s * 1e3:,.1f} ms/video {r.note}")
        except Exception as err:  # noqa: BLE001 - one failing section must not lose the rest
            traceback.print_exc(file=sys.stderr)
            rows[name] = Row(name, role=role, note=f"FAILED: {type(err).__name__}: {err}"[:200])
            if b.device.type == "cuda":
                torch.cuda.empty_cache()
    return {name: rows[name] for name, *_ in plan}


def render(b: Bench, rows: dict[str, Row], peak: float) -> str:
    base = next(r for r in rows.values() if r.role == "baseline").per_video_s
    head = ("| section | videos | LM tok/video | videos/s | ms/video | prep | enc | prefill "
            "| verdict | generate | x generate() | TFLOP/s | % peak | kept |")
    out = [head, "|" + "---|" * 14]
    for name, r in rows.items():
        if not r.seconds:
            out.append(f"| {name} | {r.note} |" + " |" * 12)
            continue
        per, n = r.per_video_s, max(r.videos, 1)
        st = {k: v / n for k, v in r.stages.items()}
        enc = r.counts.encoder_s * 1e3 / n
        cells = [f"{st['decode_video']:.0f}", f"{enc:.0f}", f"{st['prefill'] - enc:.0f}",
                 f"{st['verdict']:.0f}", f"{st['generate']:.0f}"] if st else [
                 "-", f"{enc:.0f}" if enc else "-", "-", "-", "-"]
        tflops = b.meter.flops(r.counts) / n / per / 1e12 if r.counts.lm_tokens else 0.0
        flop_cells = [f"{tflops:.3g}", f"{100 * tflops / peak:.0f}"] if tflops else ["-", "-"]
        out.append(" | ".join([
            f"| {name}", str(r.videos), f"{r.counts.lm_tokens / n:,.0f}" if tflops else "-",
            f"{1 / per:.2f}",
            f"{per * 1e3:,.0f}", *cells,
            f"{base / per:.1f}" if r.counts.lm_tokens or name.startswith("vllm") else "-",
            *flop_cells, r.kept + (f" ({r.note})" if r.note else "")]) + " |")
    return "\n".join(out) + "\n"


def verdict_lines(rows: dict[str, Row], small: bool) -> list[str]:
    base = next(r for r in rows.values() if r.role == "baseline")
    best = [r for r in rows.values() if r.role == "target" and r.seconds]
    if not best or not base.seconds:
        return ["targets: not measured (see the notes in the table)"]
    top = min(best, key=lambda r: r.per_video_s)
    vps, x = 1 / top.per_video_s, base.per_video_s / top.per_video_s
    ok = lambda good: "MET" if good else "NOT MET"  # noqa: E731
    if small:
        return [f"targets: not applicable to --small ({vps:.2f} videos/s, {x:.1f}x generate())"]
    return [f"target >= {TARGET_VPS:.0f} videos/s (parallel_cached+fast+warm+batching): "
            f"{vps:.2f} ({top.name}) -> {ok(vps >= TARGET_VPS)}",
            f"target >= {TARGET_X:.0f}x plain generate(): {x:.1f}x -> {ok(x >= TARGET_X)}"]


def memory() -> str:
    if not torch.cuda.is_available():
        return ""
    return f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", "--dry-run", action="store_true",
                    help="scaled-down model on CPU: the same code path, for testing the script")
    ap.add_argument("--budget-s", type=float, default=450.0,
                    help="global deadline, seconds from process start (default 450)")
    ap.add_argument("--attn", default="sdpa", help="attention backend for the language model")
    ap.add_argument("--policies", default="policies/safewatch.yaml")
    ap.add_argument("--out", help="also write the table as markdown here")
    ap.add_argument("--engine", default="transformers", choices=("transformers", "vllm"),
                    help="vllm: compare our runner with vLLM's engine (needs vLLM)")
    args = ap.parse_args(argv)
    if args.engine == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            print("--engine vllm: vLLM is not installed here (pip install vllm)",
                  file=sys.stderr)
            return 2
    if not args.small and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU, or pass --small for the CPU dry run",
              file=sys.stderr)
        return 2
    # a hang prints every thread's stack and exits 30 s after the deadline
    faulthandler.dump_traceback_later(args.budget_s + 30 - process_age_s(), exit=True)
    import transformers

    card = torch.cuda.get_device_name() if not args.small else "CPU (--small)"
    env = (f"{card}; torch {torch.__version__}, transformers {transformers.__version__}, "
           f"attn {args.attn}")
    log(f"{env}; {process_age_s():.0f} s since process start, budget {args.budget_s:.0f} s")
    b = Bench(args)
    peak = b.peak_tflops()
    log(f"measured peak {peak:.3g} TFLOP/s")
    try:
        checks = b.invariants()
    except Exception as err:  # noqa: BLE001 - reported in the output; the timings still run
        traceback.print_exc(file=sys.stderr)
        checks = f"CHECK FAILED: {type(err).__name__}: {err}"
    log(checks)
    with C.forced_length(b.adapter):      # generation runs its full length (see common.py)
        rows = run_all(b)
    table = render(b, rows, peak)
    lines = [f"{env}; measured matmul peak {peak:.3g} TFLOP/s "
             f"({'8192^3 bf16' if not args.small else '512^3 fp32'}); "
             f"total {process_age_s():.0f} s{memory()}", checks, *verdict_lines(rows, args.small),
             FLOPS_NOTE + f" Here P_layers = {b.meter.p_layers:.3g}, P_vit = "
             f"{b.meter.p_vis_patch:.3g}, P_merger = {b.meter.p_merger:.3g}."]
    print(table + "\n".join(lines))
    if args.out:
        C.write_markdown(args.out, f"Qwen2.5-VL-7B (random weights) on {card}", table, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
