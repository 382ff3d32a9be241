"""The engine: videos + a policy set in, `Verdict`s out. Public API:

    engine = GuardEngine.from_pretrained("/tmp/m", policies="policies/safewatch.yaml",
                                         layout="parallel", mode="fast")
    verdict = engine.check("clip.mp4")
    verdicts = engine.check_batch(["a.mp4", "b.mp4"])

Per batch of windows: the adapter turns frames into video inputs; the layout places the
segments; one prefill fills the KV cache (under `parallel_cached` the policy chunks come from a
cross-request cache); pruning drops video tokens; one more forward runs every category's verdict
probe in parallel; explain mode then decodes text over the best window's cache.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace

import torch

from guardrail.adapters import ModelAdapter, VideoInputs, VisualFeatures, create_adapter
from guardrail.adapters.registry import resolve_placement
from guardrail.calibration import Calibration, resolve
from guardrail.chunk_cache import ChunkCache
from guardrail.decode import Explanation, explain_batch, room
from guardrail.errors import GuardrailError, PromptTooLongError, UsageError
from guardrail.layout import (
    HOST,
    LAYOUTS,
    Layout,
    Segment,
    build_groups,
    concat,
    plan,
    text_segment,
)
from guardrail.policy import PolicySet, load_policy
from guardrail.prefill import prefill, prefix_kv
from guardrail.probes import answer_tokens, probe_scores
from guardrail.prompt import STYLES, VIDEO_SLOT, build_prompt, explain_tail, prompt_segments
from guardrail.pruning import PruningConfig
from guardrail.runner import Batch, Item, batch_from_prefix, batch_from_rows
from guardrail.shipped import shipped
from guardrail.verdict import Verdict, WindowResult, build_verdict
from guardrail.video import SamplingConfig, Video, VideoLimits, VideoSource, load_video

# progress(stage, done, total): see GuardEngine.check_batch
Progress = Callable[[str, int, int], None]
MODES = ("fast", "explain", "explain_flagged")
# engine name -> "module:class"; the class loads its model (`load_model`) and judges batches
ENGINES = {"transformers": "guardrail.engine:GuardEngine",
           "vllm": "guardrail.vllm_engine:VllmEngine"}
DEFAULT_POLICY = shipped("policies", "safewatch.yaml")


@dataclass(frozen=True)
class EngineConfig:
    layout: str = "parallel"
    mode: str = "fast"
    prompt_style: str = "default"  # default | safewatch (SafeWatch's released prompt text)
    max_new_tokens: int = 256
    keep_ratio: float = 1.0        # PVTP; 1.0 = off
    pruning_mode: str = "kv"       # kv | pre_prefill
    pruning_layer: int = 2
    batch_size: int = 8            # windows per forward pass in check_batch
    chunk_cache: bool = True       # reuse policy-chunk KV across requests (parallel_cached)
    chunk_cache_bytes: int = 1 << 30
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    limits: VideoLimits = field(default_factory=VideoLimits)
    decoder: str = "auto"          # video decoder: auto | decord | pyav
    calibration: str | None = None  # None/"off" | "auto" (beside the policy file, else
    #                                 <model>/calibration/<set>.json) | a calibration file
    max_prompt_tokens: int | None = None  # a window's whole prompt (policies + video), below
    #                                       the model's context: a cost budget (None: context)

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise UsageError(f"unknown layout {self.layout!r}; choose one of {', '.join(LAYOUTS)}")
        if self.mode not in MODES:
            raise UsageError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.prompt_style not in STYLES:
            raise UsageError(f"unknown prompt style {self.prompt_style!r}; choose one of "
                             f"{', '.join(STYLES)}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise UsageError("max_new_tokens and batch_size must be at least 1")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise UsageError("max_prompt_tokens must be at least 1")
        if self.layout == "isolated" and self.keep_ratio < 1.0:
            raise UsageError("keep_ratio below 1 needs the policies in the prompt before the "
                             "verdict; the isolated layout reads each policy in its own branch "
                             "after the video: use parallel or sequential to prune")
        self.pruning  # noqa: B018 - validates the pruning fields

    @property
    def pruning(self) -> PruningConfig:
        return PruningConfig(self.keep_ratio, self.pruning_mode, self.pruning_layer)

    @property
    def cached_chunks(self) -> bool:
        return self.layout == "parallel_cached" and self.chunk_cache


def _text_only(item: Item) -> Item:
    """The item without its visual features: decoding after the prompt never reads them, and
    keeping them would keep the whole batch's encoder output alive until explain mode runs."""
    embeds = item.feats.embeds
    return replace(item, feats=VisualFeatures(embeds.new_empty((0, embeds.shape[-1]))))


@dataclass(frozen=True)
class PromptTokens:
    """Token ids of the fixed prompt segments for one policy set, model and layout, in prompt
    order; the video segment is (ids before the video, ids after it)."""

    ordered: list[tuple[str, list[int] | tuple[list[int], list[int]]]]   # (kind, ids)
    probes: list[list[int]]
    keys: list[str]
    lead: list[int]     # explain mode: fed after the prompt, before the answer (isolated: the
    #                     sequential tail, every chunk and the full question)

    @property
    def text_tokens(self) -> int:
        """Tokens of the prompt without the video (every segment and probe)."""
        n = sum(len(p) for p in self.probes)
        for _, ids in self.ordered:
            n += sum(map(len, ids)) if isinstance(ids, tuple) else len(ids)
        return n


def engine_class(name: str) -> type[GuardEngine]:
    """The engine registered as `name` (transformers | vllm)."""
    if name not in ENGINES:
        raise UsageError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    import importlib

    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)


@dataclass(frozen=True)
class Prepared:
    """Videos with the host work of judging them done (`GuardEngine.prepare`): decoded, and
    for the transformers engine each window through the processor, the rope index and the
    layout, its pixels in the model's dtype (pinned when the model is on CUDA; InternVL's are
    resized on the GPU there, so already on the device). Handing it to
    `check_batch` leaves only model work; preparing the next group on another thread while
    the engine judges this one keeps the device fed across calls."""

    videos: list[Video]
    decode_ms: list[float]
    windows: list[tuple] | None          # per window, in order: `GuardEngine._prepare_window`

    @staticmethod
    def merge(parts: list[Prepared]) -> Prepared:
        """One group from several (requests batched together): windows stay in order."""
        windows = [p.windows for p in parts]
        return Prepared([v for p in parts for v in p.videos],
                        [ms for p in parts for ms in p.decode_ms],
                        None if any(w is None for w in windows) else [
                            w for ws in windows for w in ws])


class GuardEngine:
    """Judges videos against one policy set with one model. Not thread-safe (the chunk cache
    is); use one engine per worker.

    This class is the `transformers` engine (our runner: every layout, pruning, the chunk
    cache) and holds the orchestration both engines share (windows, batching, verdicts,
    calibration, explain's skeleton). `guardrail.vllm_engine.VllmEngine` overrides how a batch
    of windows is scored and how text is generated."""

    engine = "transformers"

    def __init__(self, adapter: ModelAdapter, policies: PolicySet, config: EngineConfig,
                 chunk_cache: ChunkCache | None = None, calibration: Calibration | None = None,
                 warnings: tuple[str, ...] = ()):
        self._check_config(config)
        self.adapter = adapter
        self.calibration = calibration
        self._warnings = warnings       # the engine's own; the model's are added per verdict
        self.policies = policies
        self.config = config
        self.chunks = chunk_cache if chunk_cache is not None else ChunkCache(
            config.chunk_cache_bytes)
        self.prompt = build_prompt(policies, style=config.prompt_style)
        self.tokens = self._tokenize()
        self._check_fits()
        self.answer = answer_tokens(adapter.encode_text)
        self._answer_rows = torch.tensor(self.answer.ids, dtype=torch.long, device=adapter.device)
        self.thresholds = [policies.threshold_of(c) for c in policies.categories]

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike | None = None,
                        policies: str | os.PathLike | PolicySet | None = None,
                        device: str = "auto", dtype: str = "auto", attn: str = "auto",
                        engine: str = "transformers", vllm: dict | None = None,
                        **config) -> GuardEngine:
        """Load `model` (a local directory, or a hub id where the network allows; default
        $GUARDRAIL_MODEL or Qwen2.5-VL-7B-Instruct) and judge against `policies` (a YAML path
        or a loaded set; default policies/safewatch.yaml). `engine`: transformers (our runner)
        or vllm (vLLM in process; `vllm` holds settings passed to `vllm.LLM`, e.g.
        tensor_parallel_size, gpu_memory_utilization, max_model_len). `config`: EngineConfig
        fields."""
        unknown = set(config) - {f.name for f in fields(EngineConfig)}
        if unknown:
            raise UsageError(f"unknown engine option(s): {', '.join(sorted(unknown))}")
        kind = engine_class(engine)
        cfg = EngineConfig(**config)
        kind._check_config(cfg)            # a bad layout for the engine fails before the load
        pset = policies if isinstance(policies, PolicySet) else load_policy(
            policies or DEFAULT_POLICY)
        # `auto` looks beside the user's own policy file only: never in the shipped set's
        # folder (in a source checkout, a file written there would apply to everyone)
        policy_file = None if isinstance(policies, PolicySet) else policies
        calibration = resolve(cfg.calibration, policy_file, model, pset.name)
        warnings = ()
        if cfg.calibration == "auto" and calibration is None:
            warnings = (f"calibration auto: no calibration file for policy set {pset.name!r} "
                        f"beside {policy_file or 'the policy file'} or in the model directory; "
                        "scores are uncalibrated",)
        adapter = kind.load_model(model, resolve_placement(device, dtype, attn), vllm)
        return kind(adapter, pset, cfg, calibration=calibration, warnings=warnings)

    @staticmethod
    def load_model(model: str | os.PathLike | None, placement, options: dict | None):
        if options:
            raise UsageError("vLLM settings apply to the vllm engine only")
        return create_adapter(model, placement)

    @classmethod
    def _check_config(cls, config: EngineConfig) -> None:
        """Refuse settings this engine cannot run (UsageError)."""

    def with_config(self, **changes) -> GuardEngine:
        """The same model, policies and chunk cache with other settings (no reload)."""
        return type(self)(self.adapter, self.policies, replace(self.config, **changes),
                          self.chunks, self.calibration, self._warnings)

    def with_policies(self, policies: PolicySet) -> GuardEngine:
        """The same model and settings against another set; a calibration fitted for another
        set does not follow (its category ids mean other things there)."""
        cal = self.calibration
        if cal is not None and cal.policy_set not in (None, policies.name):
            cal = None
        return type(self)(self.adapter, policies, self.config, self.chunks, cal, self._warnings)

    @property
    def calibrated(self) -> bool:
        """Whether a calibration applies to at least one category of the set."""
        return self.calibration is not None and any(
            c.id in self.calibration.scalings for c in self.policies.categories)

    @property
    def warnings(self) -> tuple[str, ...]:
        return (*getattr(self.adapter, "warnings", ()), *self._warnings)

    # ------------------------------------------------------------------ public API

    def check(self, video: VideoSource | Video) -> Verdict:
        """Judge one video (a path, raw bytes, or an already decoded `Video`)."""
        return self.check_batch([video])[0]

    def prepare(self, videos: Iterable[VideoSource | Video]) -> Prepared:
        """Decode `videos` and do the host work of judging them (no model work; safe on
        another thread while this engine judges). Raises what `check_batch` would for bad
        input (`VideoError`, `PromptTooLongError`)."""
        decoded, decode_ms = self._decode_all(videos)
        return Prepared(decoded, decode_ms, self._prepare_windows(
            [clip for video in decoded for clip in video.clips]))

    def prepare_or_none(self, videos: list[Video]) -> Prepared | None:
        """`prepare`, or None for no videos or a group it refuses with a typed error (judging
        the videos unprepared then reports that error where it always did)."""
        try:
            return self.prepare(videos) if videos else None
        except GuardrailError:
            return None

    def _decode_all(self, videos: Iterable[VideoSource | Video]
                    ) -> tuple[list[Video], list[float]]:
        decoded, decode_ms = [], []
        for v in videos:
            t = time.perf_counter()
            decoded.append(v if isinstance(v, Video) else load_video(
                v, self.config.sampling, self.config.limits, self.config.decoder))
            decode_ms.append((time.perf_counter() - t) * 1e3)
        return decoded, decode_ms

    def check_batch(self, videos: Iterable[VideoSource | Video] | Prepared,
                    progress: Progress | None = None) -> list[Verdict]:
        """Judge several videos (or a `Prepared` group of them), `batch_size` windows per
        forward pass; verdicts in input order. Bad input raises `VideoError` before any model
        work (decode first to handle it per video). `progress(stage, done, total)`, if given,
        is called as work finishes: ("judging", windows done, windows) after each forward
        batch, then in explain modes ("explaining", videos done, videos to explain)."""
        t0 = time.perf_counter()
        if isinstance(videos, Prepared):
            decoded, decode_ms, ready = videos.videos, videos.decode_ms, videos.windows
        else:
            (decoded, decode_ms), ready = self._decode_all(videos), None
        windows = [(i, clip) for i, video in enumerate(decoded) for clip in video.clips]
        results: list[list[WindowResult]] = [[] for _ in decoded]
        best: dict[int, tuple[float, tuple]] = {}     # video -> its top window (score, row)
        size = self.config.batch_size

        def batches(xs: list) -> list[list]:
            return [xs[s: s + size] for s in range(0, len(xs), size)]
        parts = batches(windows)
        if ready is not None:
            ready = batches(ready)
        done = 0
        for part, (res, batch) in zip(parts, self._run_all([[c for _, c in p] for p in parts],
                                                           ready), strict=True):
            done += len(part)
            if progress:
                progress("judging", done, len(windows))
            for row, ((i, _), r) in enumerate(zip(part, res, strict=True)):
                results[i].append(r)
                top = float(r.scores.max())
                if self.config.mode != "fast" and (i not in best or top > best[i][0]):
                    best[i] = (top, self._explain_input(batch, row))
        scores = [torch.stack([r.scores for r in rs]).amax(dim=0) for rs in results]   # [m]
        flags = [[float(x) >= t for x, t in zip(s, self.thresholds, strict=True)]
                 for s in scores]
        need = [i for i in range(len(decoded)) if self.config.mode == "explain"
                or (self.config.mode == "explain_flagged" and any(flags[i]))]
        texts, gen_ms = self._explain([best[i][1] for i in need], [flags[i] for i in need],
                                      progress)
        text_of = dict(zip(need, texts, strict=True))
        gen_of = dict(zip(need, gen_ms, strict=True))
        total = (time.perf_counter() - t0) * 1e3 / len(decoded)
        return [build_verdict(
                    self.policies, self.thresholds, video, results[i], scores[i], flags[i],
                    text_of.get(i), model=self.adapter.name, layout=self.config.layout,
                    mode=self.config.mode, keep_ratio=self.config.keep_ratio,
                    decode_ms=decode_ms[i], generate_ms=gen_of.get(i, 0.0), total_ms=total,
                    calibrated=self.calibrated, warnings=self.warnings)
                for i, video in enumerate(decoded)]

    # ------------------------------------------------------------------ one batch of windows

    def _explain_input(self, batch: Batch, row: int) -> tuple:
        """What `_explain` needs of one judged window: (item, cache tensors, slots) of its
        prompt."""
        return (_text_only(batch.items[row]), *batch.row(row))

    def judge(self, clips: list) -> tuple[list[WindowResult], Batch]:
        """Score every category on each window. Returns per-window results and the batch (its
        cache holds each window's prompt without the probes, for explain mode)."""
        return self._run(self._prepare(clips))

    def _run_all(self, batches: list[list], ready: list[list[tuple]] | None = None
                 ) -> Iterator[tuple[list[WindowResult], Batch]]:
        """`judge` each batch of clips in turn; the host work of the next batch (processor,
        rope index, layout) runs in a thread while the current one is on the device, unless
        it is `ready` (prepared earlier, per batch the `_prepare_window` of its clips)."""
        if ready is not None:
            yield from (self._run(self._stacked(windows)) for windows in ready)
            return
        if len(batches) < 2:
            yield from (self.judge(clips) for clips in batches)
            return
        with ThreadPoolExecutor(1, thread_name_prefix="guardrail-prepare") as pool:
            pending = pool.submit(self._prepare, batches[0])
            for k in range(len(batches)):
                prepared = pending.result()
                if k + 1 < len(batches):
                    pending = pool.submit(self._prepare, batches[k + 1])
                yield self._run(prepared)

    def _prepare(self, clips: list) -> tuple[list[VideoInputs], list[tuple], float]:
        """Host work of one batch: the processor, the rope index and the layouts. No model
        forward; safe to run beside one."""
        return self._stacked(self._prepare_windows(clips))

    def _prepare_windows(self, clips: list) -> list[tuple] | None:
        """`_prepare_window` of each clip (None: this engine prepares inside its model)."""
        return [self._prepare_window(c) for c in clips]

    def _prepare_window(self, clip) -> tuple[VideoInputs, tuple, float]:
        """One window's host work: (video inputs, (layout, visual mask), ms)."""
        t0 = time.perf_counter()
        inputs = self.adapter.video_inputs(clip)
        self._check_window(inputs.ids.numel())
        inputs = replace(inputs, encoder_inputs={
            k: self._handed_over(v) for k, v in inputs.encoder_inputs.items()})
        return inputs, self.layout(inputs), (time.perf_counter() - t0) * 1e3

    def _handed_over(self, tensor: torch.Tensor) -> torch.Tensor:
        """Pixels as the device takes them: in the model's dtype (the encoder casts to it
        first thing, so the values are the same; half the bytes to copy in bf16) and, still on
        the host with the model on CUDA, pinned, so the copy runs beside the device's work."""
        if tensor.is_floating_point():
            tensor = tensor.to(self.adapter.dtype)
        if self.adapter.device.type == "cuda" and tensor.device.type == "cpu":
            tensor = tensor.pin_memory()
        return tensor

    @staticmethod
    def _stacked(windows: list[tuple]) -> tuple[list[VideoInputs], list[tuple], float]:
        return ([w[0] for w in windows], [w[1] for w in windows],
                sum(w[2] for w in windows))

    def _run(self, prepared: tuple[list[VideoInputs], list[tuple], float]
             ) -> tuple[list[WindowResult], Batch]:
        inputs, layouts, prep_ms = prepared
        t1 = self._clock()
        items = [Item(lay, visual, feats) for (lay, visual), feats in
                 zip(layouts, self.adapter.visual_features_many(inputs), strict=True)]
        batch, start = self._start(items)
        probes = [torch.arange(it.probe_start, it.layout.length, device=HOST) for it in items]
        if self._folds_probes(items, start):
            # one forward for the prompt and the probes: the prompt needs a mask anyway
            prompt = [torch.arange(start, it.probe_start, device=HOST) for it in items]
            hidden, _ = batch.step([torch.cat(pair) for pair in zip(prompt, probes, strict=True)])
            kept = [int(it.visual.sum()) for it in items]
            before = [n - len(p) for n, p in zip(batch.lengths, probes, strict=True)]
            at = [len(p) for p in prompt]                   # where each row's probes start
        else:
            kept = prefill(batch, start, self.config.pruning)
            before = list(batch.lengths)
            hidden, _ = batch.step(probes)
            at = [0] * len(items)
        t2 = self._clock()
        first = items[0].probe_start
        last = torch.tensor([[a + items[0].layout.span(f"R{i}").stop - 1 - first
                              for i in range(len(self.tokens.probes))] for a in at],
                            device=HOST).to(self.adapter.device, non_blocking=True)  # [B, m]
        rows = torch.arange(len(items), device=self.adapter.device)[:, None]
        pair = self.adapter.answer_logits(hidden[rows, last], self._answer_rows)  # [B, m, 2]
        scores = [self._calibrated(s) for s in probe_scores(pair).cpu()]        # one copy
        batch.truncate(before)
        t3 = self._clock()
        share = 1.0 / len(inputs)
        results = [WindowResult(s, int(it.visual.sum()), k, (t2 - t1) * 1e3 * share,
                                (t3 - t2) * 1e3 * share, prep_ms * share)
                   for s, it, k in zip(scores, items, kept, strict=True)]
        return results, batch

    def _folds_probes(self, items: list[Item], start: int) -> bool:
        """Whether the probes run in the prefill's forward: when nothing is pruned between
        them and the prompt's step is masked anyway (parallel layouts). A sequential prompt
        runs mask-free on the backend's causal path, which a joint step would lose."""
        return not self.config.pruning.active and not all(
            bool(it.layout.solo[start: it.probe_start].all()) for it in items)

    def _clock(self) -> float:
        """perf_counter after the device has finished queued work, so stage times are real."""
        if self.adapter.device.type == "cuda":
            torch.cuda.synchronize(self.adapter.device)
        return time.perf_counter()

    def _calibrated(self, scores: torch.Tensor) -> torch.Tensor:
        """Per-category calibration of one window's scores [m] (identity without a file)."""
        if self.calibration is None:
            return scores
        ids = [c.id for c in self.policies.categories]
        return torch.from_numpy(self.calibration.apply_many(ids, scores.numpy())).to(scores.dtype)

    def _start(self, items: list[Item]) -> tuple[Batch, int]:
        """An empty batch, or under `parallel_cached` one holding the cached S + chunks prefix.
        Returns the batch and the first layout index still to run."""
        if not self.config.cached_chunks:
            return Batch(self.adapter, items), 0
        length = items[0].layout.span("V").start
        prefix = prefix_kv(self.adapter, self.chunks, items[0])
        return batch_from_prefix(self.adapter, items, prefix, length), length

    def layout(self, video: VideoInputs) -> tuple[Layout, torch.Tensor]:
        """Plan the prompt for one window. Returns the layout and its visual-token mask [T]."""
        rows, ordered, n_chunks, offset = self.adapter.rows, [], 0, 0
        for kind, ids in self.tokens.ordered:
            if kind == "video":
                before, after = ids
                seg = concat("V", text_segment("", before, rows),
                             Segment("video", video.ids, video.rel_pos[:rows], video.advance),
                             text_segment("", after, rows))
                offset = len(before)
            elif kind == "chunk":
                seg, n_chunks = text_segment(f"P{n_chunks}", ids, rows), n_chunks + 1
            elif kind == "branch":
                seg, n_chunks = text_segment(f"B{n_chunks}", ids, rows), n_chunks + 1
            else:
                seg = text_segment({"system": "S", "question": "Q"}[kind], ids, rows)
            ordered.append((kind, seg))
        probes = [text_segment(f"R{i}", ids, rows) for i, ids in enumerate(self.tokens.probes)]
        lay = plan(build_groups(self.config.layout, ordered, probes))
        visual = torch.zeros(lay.length, dtype=torch.bool, device=HOST)      # [T]
        start = lay.span("V").start + offset
        visual[start: start + video.ids.numel()] = video.visual
        return lay, visual

    def _explain(self, rows: list[tuple], flags: list[list[bool]],
                 progress: Progress | None = None) -> tuple[list[Explanation], list[float]]:
        """Decode the answer text of several windows together, `batch_size` rows at a time.
        rows: (item, cache tensors, slots) of each window's prompt cache (probes removed).
        Returns the explanations and each one's share of the decoding time in ms."""
        texts, times = [], []
        size, keys = self.config.batch_size, self.tokens.keys
        if progress and rows:
            progress("explaining", 0, len(rows))
        for start in range(0, len(rows), size):
            part, part_flags = rows[start: start + size], flags[start: start + size]
            t = time.perf_counter()
            batch = batch_from_rows(self.adapter, part, room(
                self.adapter.encode_text, keys, part_flags, self.config.max_new_tokens,
                self.tokens.lead))
            # the answer starts where the probes did: the first position after the prompt
            next_pos = [int(item.layout.positions[0, item.probe_start]) for item, _, _ in part]
            texts += explain_batch(batch, next_pos, keys, part_flags,
                                   self.config.max_new_tokens, self._stop_ids(),
                                   self.tokens.lead)
            times += [(time.perf_counter() - t) * 1e3 / len(part)] * len(part)
            if progress:
                progress("explaining", len(texts), len(rows))
        return texts, times

    def _stop_ids(self) -> set[int]:
        tok = self.adapter.tokenizer
        ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        eos = getattr(getattr(self.adapter.model, "generation_config", None), "eos_token_id", None)
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        im_end = tok.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != tok.unk_token_id:
            ids.add(im_end)
        return ids

    CONTEXT = "the model's context is"   # how a message names the context limit

    def _prompt_limit(self) -> tuple[int | None, str]:
        """The most tokens one window's prompt may take, and what sets it."""
        context = getattr(self.adapter, "context_length", None)
        budget = self.config.max_prompt_tokens
        if budget is not None and (context is None or budget < context):
            return budget, f"this server's prompt budget is {budget:,} tokens"
        return context, f"{self.CONTEXT} {context:,} tokens"

    def _check_fits(self) -> None:
        """Refuse a policy set whose prompt cannot fit the model's context (or the prompt
        budget), before any tensor is built (a 900 KB policy once asked the layout for 810 GB;
        a 32 K-token one stalled a server for minutes)."""
        limit, why = self._prompt_limit()
        need = self.tokens.text_tokens
        if limit is not None and need >= limit:
            raise PromptTooLongError(
                f"policy set {self.policies.name!r}: the prompt needs {need:,} tokens before the "
                f"video (layout {self.config.layout}); {why}")

    def _check_window(self, video_tokens: int) -> None:
        """Refuse a window whose prompt (policies + its video tokens) is over the budget,
        before the model sees it."""
        limit, why = self._prompt_limit()
        need = self.tokens.text_tokens + video_tokens
        if limit is not None and need > limit:
            raise PromptTooLongError(
                f"a window's prompt needs {need:,} tokens ({self.tokens.text_tokens:,} of "
                f"policies and text, {video_tokens:,} of video); {why}: judge fewer frames "
                "per window or a shorter policy set")

    def _tokenize(self) -> PromptTokens:
        enc = self.adapter.encode_text
        before, after = self.adapter.chat_frame()
        ordered: list = []
        for kind, text in prompt_segments(self.prompt, self.config.layout):
            if kind == "system":
                text = before + text
            elif kind in ("question", "branch"):
                text = text + after
            if kind == "video":
                head, tail = text.split(VIDEO_SLOT)
                ordered.append((kind, (enc(head), enc(tail))))
            else:
                ordered.append((kind, enc(text)))
        lead = enc(explain_tail(self.prompt) + after) if self.config.layout == "isolated" else []
        return PromptTokens(ordered, [enc(r) for r in self.prompt.probes], list(self.prompt.keys),
                            lead)
