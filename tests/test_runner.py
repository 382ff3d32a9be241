"""The runner's contract with the attention backends and the decode loop: a step the layout
calls causal really is, explain mode decodes a batch in one loop, the probe head reads two
rows of the head in fp32."""

from __future__ import annotations

import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from guardrail.engine import GuardEngine
from guardrail.layout import HOST
from guardrail.video import load_video


@pytest.fixture(scope="module", params=["qwen2_5_vl", "internvl"])
def engine(request, tiny_model) -> GuardEngine:
    return GuardEngine.from_pretrained(tiny_model(request.param))


@pytest.fixture(scope="module")
def videos(video_files):
    return [load_video(video_files[f]) for f in ("mp4_h264", "gif", "avi_mjpeg", "mp4_h264")]


def _spy(engine, monkeypatch) -> list:
    calls = []
    adapter = engine.adapter
    real = type(adapter).forward

    def forward(self, embeds, positions, visible, cache, *args, **kwargs):
        calls.append((embeds.shape, visible, cache.get_seq_length()))
        return real(self, embeds, positions, visible, cache, *args, **kwargs)

    monkeypatch.setattr(type(adapter), "forward", forward)
    return calls


@pytest.mark.parametrize("config", [
    {"layout": "sequential"}, {"layout": "parallel", "keep_ratio": 0.5},
    {"layout": "parallel_cached"}, {"layout": "sequential", "mode": "explain",
                                    "max_new_tokens": 6}])
def test_a_step_called_causal_is_causal(engine, videos, config, monkeypatch):
    """When the layout lets the backend use its own causal path (no mask), the visibility rule
    gives exactly the bottom-right causal matrix; every other step gets a mask."""
    calls = _spy(engine, monkeypatch)
    engine.with_config(**config).check_batch(videos[:2])
    causal_steps = 0
    for _, vis, _past in calls:
        dense = vis.dense()
        b, q, k = dense.shape
        tri = torch.ones(q, k, dtype=torch.bool, device=dense.device).tril(k - q)
        is_causal = bool((dense == tri).all())
        if vis.causal:
            causal_steps += 1
            assert is_causal
    if config["layout"] == "sequential":
        assert causal_steps > 0                # sequential prefills and decode steps are


def test_explain_decodes_the_batch_together(engine, videos, monkeypatch):
    """Four videos in explain mode take about `max_new_tokens` decode forwards, not four
    times that: all rows decode in one loop."""
    max_new = 12
    eng = engine.with_config(mode="explain", max_new_tokens=max_new, batch_size=8)
    calls = _spy(eng, monkeypatch)
    verdicts = eng.check_batch(videos)
    decode_steps = [c for c in calls if c[0][0] == len(videos) and c[2] > 0 and c[0][1] < 200]
    # the opener, each generated token, the forced verdict block, the explanation
    assert len(decode_steps) <= max_new + 3
    assert all(v.description is not None for v in verdicts)


def test_answer_logits_are_the_heads_rows_in_fp32(engine):
    adapter = engine.adapter
    hidden = torch.randn(3, 5, adapter.model.config.get_text_config().hidden_size,
                         generator=torch.Generator().manual_seed(0)).to(adapter.device)
    ids = torch.tensor(engine.answer.ids, device=adapter.device)
    pair = adapter.answer_logits(hidden, ids)
    assert pair.shape == (3, 5, 2) and pair.dtype == torch.float32
    assert torch.allclose(pair, adapter.logits(hidden)[..., ids], atol=1e-5, rtol=0)


def test_next_batch_is_prepared_beside_the_current_one(engine, videos, monkeypatch):
    """With several batches, the processor work of batch k + 1 runs in a helper thread while
    batch k is on the device; the verdicts are those of one batch at a time."""
    import threading

    adapter, seen = engine.adapter, []
    real = type(adapter).video_inputs

    def video_inputs(self, clip):
        seen.append(threading.current_thread().name)
        return real(self, clip)

    eng = engine.with_config(batch_size=1)
    want = [eng.judge([v.clips[0]])[0][0].scores for v in videos]
    monkeypatch.setattr(type(adapter), "video_inputs", video_inputs)
    got = eng.check_batch(videos)
    assert all(name.startswith("guardrail-prepare") for name in seen) and len(seen) == 4
    for v, w in zip(got, want, strict=True):
        assert [c.score for c in v.categories] == pytest.approx(w.tolist(), abs=1e-6)


@pytest.mark.parametrize("layout", ["parallel", "parallel_cached", "sequential"])
def test_probes_run_in_the_prompts_forward_where_the_layout_allows(engine, videos, layout,
                                                                   monkeypatch):
    """Without pruning, a prompt step that needs a mask anyway (the parallel layout's
    policies) also runs the probes: one forward of the batch instead of two, the same scores.
    A causal prompt (sequential; parallel_cached after its cached policy prefix) keeps its
    mask-free step and a probe step after it."""
    eng = engine.with_config(layout=layout)
    clips = [v.clips[0] for v in videos[:3]]
    eng.judge(clips)                                       # warm: the policy chunk cache
    calls = _spy(eng, monkeypatch)
    folded = eng.judge(clips)[0]
    assert len(calls) == (1 if layout == "parallel" else 2)
    monkeypatch.setattr(GuardEngine, "_folds_probes", lambda self, items, start: False)
    apart = eng.judge(clips)[0]
    for a, b in zip(folded, apart, strict=True):
        assert torch.allclose(a.scores, b.scores, atol=1e-5, rtol=0)


class _HostCopies(TorchFunctionMode):
    """Counts copies to the host made from one source file."""

    def __init__(self, source: str):
        super().__init__()
        self.source, self.count = source, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # on a CPU the model's device is the host too: a copy to the host is `.cpu()` or a
        # `.to(HOST)`, the engine's name for it
        to_host = func is torch.Tensor.cpu or (func is torch.Tensor.to and any(
            a is HOST for a in (*args[1:], kwargs.get("device"))))
        if to_host and sys._getframe(1).f_code.co_filename.endswith(self.source):
            self.count += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("mode", ["kv", "pre_prefill"])
def test_pruning_brings_the_kept_tokens_to_the_host_once_per_batch(engine, videos, mode):
    eng = engine.with_config(layout="parallel", keep_ratio=0.5, pruning_mode=mode)
    clips = [v.clips[0] for v in videos]
    with _HostCopies("guardrail/prefill.py") as copies:
        results, _ = eng.judge(clips)
    assert copies.count == 1                              # not one per row
    assert all(r.kept_tokens < r.total_tokens for r in results)


def test_the_visual_encoder_runs_once_per_batch(engine, videos, monkeypatch):
    model = engine.adapter.model.model
    name = "get_video_features" if hasattr(model, "get_video_features") else (
        "get_image_features")
    calls = []
    real = getattr(model, name)

    def encoder(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(model, name, encoder)
    engine.judge([v.clips[0] for v in videos])
    assert len(calls) == 1
