"""Shared pieces of the speed benchmarks (`bench/speed_cpu.py`, `bench/gpu_qwen25_7b.py`).

- `build_model(spec, ...)`: a random-weight Qwen2.5-VL built from a config (no download), at
  the real 7B size (`SPECS["7b"]`) or scaled down (`SPECS["small"]`), directly on its device.
- `build_processor()`: the official Qwen2.5-VL processor classes around the tiny models'
  tokenizer (`guardrail.tiny.build_tokenizer()`), sized so that 448x448 frames stay 448x448:
  8 frames -> 4 x 32 x 32 patches -> 1,024 video tokens.
- `synthetic_video()` / `encode_mp4()`: decoded videos for model timings (no decoding inside
  them) and a real file for timing the decoder on its own.
- `Meter`: forward hooks that count what the model really runs (language-model tokens, attended
  key pairs, lm_head rows, encoder patches) and turn it into FLOPs.
- `forced_length()`: greedy decoding that cannot stop early, for fixed-length generate timings.
- `median_times()`: warm-up, then interleaved repeats, median per configuration.
"""

from __future__ import annotations

import inspect
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from guardrail.adapters.qwen_vl import QwenVLAdapter
from guardrail.video import Clip, Video, VideoInfo, Window

FRAME_PX = 448
NUM_FRAMES = 8

# Qwen2.5-VL-7B-Instruct's config.json, architecture fields. Token ids come from the bench
# tokenizer (its ids are < 2,400, inside the real 152,064-row embedding).
_TEXT_7B = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
                max_position_embeddings=128000, rms_norm_eps=1e-6, hidden_act="silu",
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": [16, 24, 24]})
_VISION_7B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                  out_hidden_size=3584, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                  tokens_per_second=2, in_channels=3, hidden_act="silu")
# Scaled down for CPU runs: same layout rules (head_dim 64, mrope sections sum to 32, the real
# patch / merge / window sizes, so the same 1,024 video tokens per 8-frame 448px clip).
_TEXT_SMALL = dict(_TEXT_7B, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=704, vocab_size=4096,
                   max_position_embeddings=32768,
                   rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                    "mrope_section": [8, 12, 12]})
_VISION_SMALL = dict(_VISION_7B, depth=4, hidden_size=128, intermediate_size=256, num_heads=2,
                     out_hidden_size=256, fullatt_block_indexes=[1, 3])
SPECS = {"7b": (_TEXT_7B, _VISION_7B), "small": (_TEXT_SMALL, _VISION_SMALL)}

# Qwen2.5-VL's chat template (text and media parts; the default system message).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VIDEO_MARKS = "<|vision_start|><|video_pad|><|vision_end|>"


def build_processor() -> Any:
    """Qwen2_5_VLProcessor with Qwen's own pixel bounds (128..768 x 28x28 per frame), so a
    448x448 frame (256 x 28x28) is not resized."""
    import transformers

    from guardrail.tiny import build_tokenizer

    bounds = {"shortest_edge": 128 * 28 * 28, "longest_edge": 768 * 28 * 28}
    norm = dict(image_mean=[0.48145466, 0.4578275, 0.40821073],
                image_std=[0.26862954, 0.26130258, 0.27577711])
    image = transformers.Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2,
                                               size=bounds, **norm)
    video = transformers.Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2,
                                               size=bounds, cap_pixels_per_frame=False, **norm)
    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return transformers.Qwen2_5_VLProcessor(image_processor=image, tokenizer=tokenizer,
                                            video_processor=video, chat_template=CHAT_TEMPLATE)


def build_model(spec: str, tokenizer: Any, device: str | torch.device, dtype: torch.dtype,
                attn: str = "sdpa", seed: int = 0) -> Any:
    """A random Qwen2_5_VLForConditionalGeneration of `spec` ("7b" | "small"), created on
    `device` in `dtype` (no CPU copy, no checkpoint). Weights ~ N(0, 0.02)."""
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text, vision = SPECS[spec]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (
        "<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
        "<|vision_end|>")}
    special = dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                   pad_token_id=ids["<|endoftext|>"])
    config = Qwen2_5_VLConfig(
        text_config=dict(text, **special), vision_config=dict(vision),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False, **special)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            config, dtype=dtype, attn_implementation=attn)
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], pad_token_id=ids["<|endoftext|>"],
        do_sample=False)
    _check_init(model)
    return model.eval()


@torch.no_grad()
def _check_init(model: Any) -> None:
    """Random weights must be finite and not degenerate (never time on zeros or garbage). Where
    the library left memory uninitialised, draw N(0, 0.02) (norms: ones) here."""
    probe = model.model.language_model.layers[0].mlp.up_proj.weight
    if all(bool(torch.isfinite(p).all()) for p in model.parameters()) and (
            0.01 < float(probe.float().std()) < 0.04):
        return
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.zero_()
        elif p.dim() == 1:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02)


def make_adapter(model: Any, processor: Any, name: str, attn: str = "sdpa") -> QwenVLAdapter:
    """QwenVLAdapter around a built model (passes `attn` where the adapter takes it)."""
    if "attn" in inspect.signature(QwenVLAdapter.__init__).parameters:
        return QwenVLAdapter(model, processor, name, attn=attn)
    return QwenVLAdapter(model, processor, name)


def synthetic_video(seed: int, frames: int = NUM_FRAMES, px: int = FRAME_PX,
                    duration_s: float = 10.0, fps: float = 24.0) -> Video:
    """A decoded one-window video: `frames` random RGB frames sampled from a `duration_s` clip."""
    rng = np.random.default_rng(seed)
    total = round(duration_s * fps)
    indices = tuple(int((i + 0.5) * total / frames) for i in range(frames))
    pixels = rng.integers(0, 256, (frames, px, px, 3), dtype=np.uint8)
    info = VideoInfo("synthetic", "raw", duration_s, fps, px, px, total, pixels.nbytes,
                     "synthetic")
    window = Window(0.0, duration_s, indices, tuple(i / fps for i in indices))
    return Video(info, (Clip(window, pixels, fps),))


def encode_mp4(seconds: float = 10.0, fps: int = 24, px: int = FRAME_PX) -> bytes:
    """An h264 mp4 of moving noise blocks, for timing real decoding."""
    import io

    import av

    buf, rng = io.BytesIO(), np.random.default_rng(0)
    base = rng.integers(0, 256, (px // 16, px // 16, 3), dtype=np.uint8)
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = px, px, "yuv420p"
        for i in range(round(seconds * fps)):
            frame = np.roll(base, i, axis=1).repeat(16, 0).repeat(16, 1)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    return buf.getvalue()


def standard_prompt(processor: Any, policies: Any) -> str:
    """The plain MLLM prompt: the chat template around the engine's `sequential` prompt text
    (S, the video, every policy chunk in order, Q), the video where the engine puts it."""
    from guardrail.prompt import build_prompt, render_prompt

    text = render_prompt(build_prompt(policies), "sequential", video=VIDEO_MARKS)
    messages = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def plain_generate(model: Any, processor: Any, prompt: str, video: Video, new_tokens: int
                   ) -> int:
    """transformers' own path: processor, then `generate()` greedy with exactly `new_tokens`
    new tokens (min_new_tokens = max_new_tokens, so EOS cannot end it early). Returns the
    number of new tokens (checked by the caller)."""
    from transformers.video_utils import VideoMetadata

    clip = video.clips[0]
    meta = VideoMetadata(total_num_frames=video.info.num_frames, fps=clip.fps,
                         height=clip.frames.shape[1], width=clip.frames.shape[2],
                         duration=video.info.duration_s, frames_indices=list(clip.window.indices))
    inputs = processor(text=[prompt], videos=[clip.frames], video_metadata=[meta],
                       do_sample_frames=False, return_tensors="pt").to(model.device)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False)
    return int(out.shape[1] - inputs["input_ids"].shape[1])


def write_markdown(path: str, title: str, table: str, lines: list[str]) -> None:
    """A benchmark's table and notes as a markdown file under its title and command line."""
    with open(path, "w") as f:
        f.write(f"# {title}\n\n`{' '.join(sys.argv)}`\n\n" + table + "\n" + "\n\n".join(lines)
                + "\n")


# ------------------------------------------------------------------ counting what runs


@dataclass
class Counts:
    lm_calls: int = 0
    lm_tokens: int = 0          # B * n summed over language-model forwards (padding included)
    decode_steps: int = 0       # forwards of one new token in a batch of one
    pairs: int = 0              # visible (query, key) pairs, when counted
    head_rows: int = 0          # lm_head rows
    patches: int = 0            # encoder patches
    vision_attn: int = 0        # sum over encoder layers of sequence-length^2 terms
    encoder_s: float = 0.0

    def minus(self, other: Counts) -> Counts:
        return Counts(**{k: getattr(self, k) - getattr(other, k) for k in self.__dict__})


@dataclass
class Meter:
    """Hooks on the model that count its work. `sync` synchronises CUDA after every language
    model and encoder forward, so that wall-clock stage times mean what they say (the engine
    reads host clocks). `pairs` counts visible attention pairs (one pass over each mask)."""

    model: Any
    sync: bool = False
    pairs: bool = False
    counts: Counts = field(default_factory=Counts)

    def __post_init__(self):
        m = self.model
        vis, vc = m.model.visual, m.config.vision_config
        self.p_vis_patch = sum(p.numel() for n, p in vis.named_parameters()
                               if not n.startswith("merger."))
        self.p_merger = sum(p.numel() for p in vis.merger.parameters())
        self.vis_width, self.merge = vc.hidden_size, vc.spatial_merge_size ** 2
        self.win = (vc.window_size // vc.patch_size) ** 2
        self.n_full = len(vc.fullatt_block_indexes)
        self.n_win = vc.depth - self.n_full
        self._install(vis)

    def _install(self, vis) -> None:
        """Language-model sizes and the hooks on the LM, its head and the vision tower `vis`
        (shared by every family's meter; the vision counting is the family's `_vis_pre`)."""
        m = self.model
        lm, tc = m.model.language_model, m.config.text_config
        self.p_layers = sum(p.numel() for p in lm.layers.parameters())
        self.attn_width = tc.num_attention_heads * (getattr(tc, "head_dim", None)
                                                    or tc.hidden_size // tc.num_attention_heads)
        self.n_layers = tc.num_hidden_layers
        self.p_head = m.lm_head.weight.numel()
        self._t0 = 0.0
        self.handles = [
            lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True),
            lm.register_forward_hook(self._after),
            m.lm_head.register_forward_pre_hook(self._head),
            vis.register_forward_pre_hook(self._vis_pre, with_kwargs=True),
            vis.register_forward_hook(self._vis_post),
        ]

    def _lm_pre(self, module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        if x is None:
            return
        b, n = x.shape[:2]
        c = self.counts
        c.lm_calls, c.lm_tokens = c.lm_calls + 1, c.lm_tokens + b * n
        c.decode_steps += int(b == 1 and n == 1)
        if self.pairs:
            mask = kwargs.get("attention_mask")
            if mask is not None and mask.dim() == 4:     # the engine's: additive, 0 = visible
                c.pairs += int(mask.sum() if mask.dtype == torch.bool else (mask == 0).sum())
            else:       # causal over the cache: n * past + n (n + 1) / 2 per row
                cache = kwargs.get("cache", kwargs.get("past_key_values"))
                past = cache.get_seq_length() if cache is not None else 0
                c.pairs += b * (n * past + n * (n + 1) // 2)

    def _after(self, *_):
        if self.sync and torch.cuda.is_available():
            torch.cuda.synchronize()

    def _head(self, module, args):
        self.counts.head_rows += args[0].numel() // args[0].shape[-1]

    def _vis_pre(self, module, args, kwargs):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        for t, h, w in (grid.tolist() if grid is not None else []):
            self.counts.patches += t * h * w
            self.counts.vision_attn += t * h * w * (self.n_win * self.win + self.n_full * h * w)
        self._after()
        self._t0 = time.perf_counter()

    def _vis_post(self, *_):
        self._after()
        self.counts.encoder_s += time.perf_counter() - self._t0

    def snapshot(self) -> Counts:
        return Counts(**self.counts.__dict__)

    def flops(self, c: Counts) -> float:
        """FLOPs of the work in `c` (formula in bench/README.md):
        LM   2 P_layers N_tok + 4 L (H d) N_pairs + 2 D V N_head_rows
        ViT  2 P_vit N_patch + 2 P_merger N_patch / 4 + 4 D_v sum_layers seq^2"""
        lm = (2 * self.p_layers * c.lm_tokens + 4 * self.n_layers * self.attn_width * c.pairs
              + 2 * self.p_head * c.head_rows)
        vit = (2 * self.p_vis_patch * c.patches + 2 * self.p_merger * c.patches / self.merge
               + 4 * self.vis_width * c.vision_attn)
        return float(lm + vit)

    def close(self):
        for h in self.handles:
            h.remove()


@contextmanager
def forced_length(adapter: Any) -> Iterator[None]:
    """Greedy decoding through `adapter.logits` that cannot stop early: every special token,
    every token whose text holds a newline, and every id the tokenizer cannot decode get -inf.
    The engine's explain mode then always generates exactly `max_new_tokens` tokens (the probes
    read only ` true` / ` false`, which stay)."""
    tok, original = adapter.tokenizer, adapter.logits
    vocab = adapter.model.get_output_embeddings().weight.shape[0]
    banned = torch.ones(vocab, dtype=torch.bool)
    special = set(tok.all_special_ids)
    for i in range(min(len(tok), vocab)):
        banned[i] = i in special or "\n" in tok.decode([i])
    banned = banned.to(adapter.device)

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        return original(hidden).masked_fill(banned, float("-inf"))

    adapter.logits = logits
    try:
        yield
    finally:
        del adapter.logits


# ------------------------------------------------------------------ timing


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_times(runs: dict[str, Callable[[int], None]], repeats: int, device: Any,
                 warmup: int = 1, log: Callable[[str], None] = print) -> dict[str, list[float]]:
    """Time each `runs[name](i)` (i = repeat index) `warmup` + `repeats` times; repeats are
    interleaved across configurations (round-robin) so that drift on a shared machine hits all
    alike. Returns seconds per repeat (warm-up excluded)."""
    for name, fn in runs.items():
        for w in range(warmup):
            fn(-1 - w)
        log(f"warmed {name}")
    out: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(repeats):
        for name, fn in runs.items():
            sync(device)
            t = time.perf_counter()
            fn(r)
            sync(device)
            out[name].append(time.perf_counter() - t)
        log(f"round {r + 1}/{repeats} done")
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")
