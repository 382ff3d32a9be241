"""InternVL2-8B (SafeWatch-8B's architecture) on one GPU: the engine's paths against plain
transformers `generate()`, timed exactly as bench/gpu_qwen25_7b.py times Qwen2.5-VL-7B.

    python bench/gpu_internvl_8b.py [--out $OUT/gpu_internvl.md]   # one H100: ~5 min, stop 7.5
    python bench/gpu_internvl_8b.py --small                        # same code, CPU, scaled down

No download, no conversion: InternVL2-8B's `config.json` values (reference/internvl.md §1) go
through `guardrail.convert`'s own whitelist config builder, and the native
`InternVLForConditionalGeneration` (InternViT-300M at 448 px, 256 tokens per frame, InternLM2-7B
as a Llama with 32 query / 8 KV heads, vocabulary 92,553; 8,075,365,376 parameters) is created
with random bf16 weights directly on the GPU. The tokenizer is the tiny InternVL one (ids inside
the real vocabulary), frames are 8 pre-decoded 448x448 tiles (2,048 video tokens), the policies
SafeWatch's six. Sections, deadline, self-checks and the table are gpu_qwen25_7b.py's (imported,
not copied); only the model, the meter and the plain-generate baseline differ.
"""

from __future__ import annotations

import argparse
import faulthandler
import inspect
import os
import sys
import time
from pathlib import Path

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [BENCH, os.path.dirname(BENCH)]   # bench/ helpers; the repo, where not installed

import common as C  # noqa: E402 - bench/ is not a package; run as a script
import gpu_qwen25_7b as Q  # noqa: E402

from guardrail.adapters.internvl import InternVLAdapter  # noqa: E402
from guardrail.convert.internvl import Source, target_config  # noqa: E402
from guardrail.convert.processor import internvl_processor  # noqa: E402
from guardrail.convert.tokenizer import AddedToken  # noqa: E402
from guardrail.engine import EngineConfig, GuardEngine  # noqa: E402
from guardrail.policy import load_policy  # noqa: E402
from guardrail.prompt import build_prompt, render_prompt  # noqa: E402
from guardrail.tiny import internvl_tokenizer  # noqa: E402

INTERNVL2_8B_PARAMS = 8_075_365_376
VIDEO_TOKENS = C.NUM_FRAMES * 256
LLM = dict(architectures=["InternLM2ForCausalLM"], hidden_size=4096, intermediate_size=14336,
           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
           rms_norm_eps=1e-5, hidden_act="silu", max_position_embeddings=32768, rope_theta=1e6,
           rope_scaling={"type": "dynamic", "factor": 2.0}, vocab_size=92553, bias=False,
           bos_token_id=1, eos_token_id=2, pad_token_id=2,
           attn_implementation="flash_attention_2")        # dropped by the whitelist builder
VIT = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
           image_size=448, patch_size=14, qkv_bias=True, qk_normalization=False,
           norm_type="layer_norm", layer_norm_eps=1e-6, hidden_act="gelu")
TOP = dict(model_type="internvl_chat", downsample_ratio=0.5, force_image_size=448,
           select_layer=-1, ps_version="v2", template="internlm2-chat")
# --small: the same layout (448 px tiles, 256 tokens per frame, GQA 4:1, full vocabulary) shrunk.
SMALL = (dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=2),
         dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2))


def build_model(tokenizer, small: bool, device: torch.device, dtype: torch.dtype, attn: str):
    from transformers import InternVLForConditionalGeneration

    llm, vit = (dict(LLM, **SMALL[0]), dict(VIT, **SMALL[1])) if small else (LLM, VIT)
    context = AddedToken(tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), "<IMG_CONTEXT>")
    config = target_config(Source(Path("."), dict(TOP, llm_config=llm, vision_config=vit), {},
                                  [context], {}, "", "bench"))
    torch.manual_seed(0)
    with torch.device(device):
        model = InternVLForConditionalGeneration._from_config(
            config, dtype=dtype, attn_implementation=attn)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters()), "non-finite init"
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


class InternVLMeter(C.Meter):
    """C.Meter's counting for InternVL: the same language-model hooks; the vision tower counted
    per 448 tile (1,025 tokens through 24 layers, full attention), then the projector."""

    def __post_init__(self):
        m = self.model
        vis, vc = m.model.vision_tower, m.config.vision_config
        self.p_vit = sum(p.numel() for p in vis.parameters())
        self.p_proj = sum(p.numel() for p in m.model.multi_modal_projector.parameters())
        self.vis_width, self.vis_layers = vc.hidden_size, vc.num_hidden_layers
        self.seq = (vc.image_size[0] // vc.patch_size[0]) ** 2 + 1
        self.per_tile = m.config.image_seq_length
        self._install(vis)

    def _vis_pre(self, module, args, kwargs):
        tiles = kwargs.get("pixel_values", args[0] if args else None).shape[0]
        self.counts.patches += tiles * self.seq
        self.counts.vision_attn += tiles * self.seq ** 2 * self.vis_layers
        self._after()
        self._t0 = time.perf_counter()

    def flops(self, c: C.Counts) -> float:
        """LM as C.Meter; ViT 2 P_vit N_tok + 4 D_v sum_layers seq^2 + 2 P_proj N_tiles 256."""
        lm = (2 * self.p_layers * c.lm_tokens + 4 * self.n_layers * self.attn_width * c.pairs
              + 2 * self.p_head * c.head_rows)
        tiles = c.patches / self.seq
        vit = (2 * self.p_vit * c.patches + 4 * self.vis_width * c.vision_attn
               + 2 * self.p_proj * tiles * self.per_tile)
        return float(lm + vit)


class Bench(Q.Bench):
    """gpu_qwen25_7b.Bench with the InternVL model; every measurement method is inherited."""

    def __init__(self, args):
        self.args, self.small, self.budget = args, args.small, args.budget_s
        self.device = torch.device("cpu" if args.small else "cuda")
        self.new_tokens = 16 if args.small else Q.NEW_TOKENS
        self.batches = (2, 4) if args.small else (8, 16)
        dtype = torch.float32 if args.small else torch.bfloat16
        tokenizer = internvl_tokenizer()
        self.processor = internvl_processor(tokenizer, 448, 256)
        t = time.perf_counter()
        self.model = build_model(tokenizer, args.small, self.device, dtype, args.attn)
        n = sum(p.numel() for p in self.model.parameters())
        Q.log(f"built model in {time.perf_counter() - t:.1f} s: {n:,} params, {dtype}, "
              f"{self.device}")
        if not args.small:
            assert n == INTERNVL2_8B_PARAMS, f"{n:,} params, InternVL2-8B has 8,075,365,376"
        name = "random-InternVL2-" + ("small" if args.small else "8B")
        takes_attn = "attn" in inspect.signature(InternVLAdapter.__init__).parameters
        self.adapter = (InternVLAdapter(self.model, self.processor, name, attn=args.attn)
                        if takes_attn else InternVLAdapter(self.model, self.processor, name))
        self.meter = InternVLMeter(self.model, sync=True, pairs=True)
        self.engine = GuardEngine(self.adapter, load_policy(args.policies),
                                  EngineConfig(mode="fast", max_new_tokens=self.new_tokens))
        text = render_prompt(build_prompt(self.engine.policies), "sequential", video="<video>")
        self.prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
        self.pool = [C.synthetic_video(seed) for seed in range(32 if not args.small else 16)]
        self.next = 0

    def generate_row(self, name: str, calls: int) -> Q.Row:
        """transformers' own path: InternVLProcessor (frames as `Frame{i}: <img>...</img>`
        lines), then greedy `generate()` of exactly `new_tokens` new tokens."""
        row = Q.Row(name, new_tokens=self.new_tokens)
        self._generate(self.videos(1)[0], 8)
        for r in range(calls):
            if r and self.left() < 45:
                row.note = f"deadline: {r} of {calls} timed calls"
                break
            before = self.meter.snapshot()
            C.sync(self.device)
            t = time.perf_counter()
            got = self._generate(self.videos(1)[0], self.new_tokens)
            C.sync(self.device)
            row.seconds.append(time.perf_counter() - t)
            assert got == self.new_tokens, f"generate() made {got} tokens"
            self._add(row, self.meter.counts.minus(before), 1)
        return row

    def _generate(self, video, new_tokens: int) -> int:
        inputs = self.processor(text=[self.prompt], videos=[video.clips[0].frames],
                                return_tensors="pt").to(self.device)
        assert int((inputs["input_ids"] == self.model.config.image_token_id).sum()) == (
            VIDEO_TOKENS), "the processor must give 256 tokens per frame"
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False)
        return int(out.shape[1] - inputs["input_ids"].shape[1])

    def _check(self, name: str, verdicts, got: C.Counts, batch: int, new_tokens: int) -> None:
        assert len(verdicts) == batch, f"{name}: {len(verdicts)} verdicts for {batch} videos"
        for v in verdicts:
            scores = [c.score for c in v.categories]
            assert all(0.0 <= s <= 1.0 for s in scores), f"{name}: scores {scores}"
            assert v.pruning.total_tokens == VIDEO_TOKENS, (
                f"{name}: {v.pruning.total_tokens} video tokens")
        self._check_tokens(name, verdicts, got, batch, new_tokens)

    def invariants(self) -> str:
        """gpu_qwen25_7b's agreement checks plus PEPE order invariance (bf16, not asserted)."""
        v0, v1 = self.pool[0], self.pool[1]
        video = self.adapter.video_inputs(v0.clips[0])
        assert video.num_visual == VIDEO_TOKENS, f"{video.num_visual} video tokens per clip"
        pc = self.engine.with_config(layout="parallel_cached")
        pc.chunks.clear()
        cold, warm = pc.check(v0).scores(), pc.check(v0).scores()
        batched = pc.with_config(batch_size=2).check_batch([v0, v1])[0].scores()
        par = self.engine.with_config(layout="parallel")
        cats = par.policies.categories
        flipped = par.with_policies(par.policies.model_copy(update={"categories": cats[::-1]}))
        ordered, reversed_ = par.check(v0).scores(), flipped.check(v0).scores()

        def diff(a: dict, b: dict) -> float:
            return max(abs(a[k] - b[k]) for k in a)

        lay, _ = pc.layout(video)
        return (f"prompt {lay.length:,} tokens incl. {VIDEO_TOKENS:,} video + probes, of which "
                f"{lay.span('V').start:,} (S + policy chunks) cached under parallel_cached; "
                f"max |score diff| ({str(self.adapter.dtype)[6:]}, not asserted): warm vs cold "
                f"cache {diff(cold, warm):.1e}, batched vs single {diff(warm, batched):.1e}, "
                f"parallel with the policy order reversed {diff(ordered, reversed_):.1e}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", "--dry-run", action="store_true",
                    help="scaled-down model on CPU: the same code path, for testing the script")
    ap.add_argument("--budget-s", type=float, default=450.0,
                    help="global deadline, seconds from process start (default 450)")
    ap.add_argument("--attn", default="sdpa", help="attention backend for the language model")
    ap.add_argument("--policies", default=os.path.join(os.path.dirname(BENCH), "policies",
                                                       "safewatch.yaml"))
    ap.add_argument("--out", help="also write the table as markdown here")
    args = ap.parse_args(argv)
    if not args.small and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU, or pass --small for the CPU dry run",
              file=sys.stderr)
        return 2
    # a hang prints every thread's stack and exits 30 s after the deadline
    faulthandler.dump_traceback_later(args.budget_s + 30 - Q.process_age_s(), exit=True)
    import transformers

    card = torch.cuda.get_device_name() if not args.small else "CPU (--small)"
    env = (f"{card}; torch {torch.__version__}, transformers {transformers.__version__}, "
           f"attn {args.attn}")
    Q.log(f"{env}; {Q.process_age_s():.0f} s since process start, budget {args.budget_s:.0f} s")
    b = Bench(args)
    peak = b.peak_tflops()
    Q.log(f"measured peak {peak:.3g} TFLOP/s")
    checks = b.invariants()
    Q.log(checks)
    with C.forced_length(b.adapter):      # generation runs its full length (see common.py)
        rows = Q.run_all(b)
    table = Q.render(b, rows, peak)
    m = b.meter
    lines = [f"{env}; measured matmul peak {peak:.3g} TFLOP/s; total {Q.process_age_s():.0f} s",
             checks, *Q.verdict_lines(rows, args.small),
             Q.FLOPS_NOTE.split(" vision encoder")[0] + " vision tower 2*P_vit*N_tokens + "
             "4*D_vit*sum_layers(1,025^2 per tile) + 2*P_proj*256 per tile. Here P_layers = "
             f"{m.p_layers:.3g}, P_vit = {m.p_vit:.3g}, P_proj = {m.p_proj:.3g}."]
    print(table + "\n".join(lines))
    if args.out:
        C.write_markdown(args.out, f"InternVL2-8B (random weights) on {card}", table, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
