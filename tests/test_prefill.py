"""Speed paths that must not change what the engine decides (SPEC §4.2 invariants 3 and 4,
§4.3): pruning, the cross-request chunk cache, batching across videos."""

from __future__ import annotations

import math

import pytest
import torch

from guardrail.chunk_cache import ChunkCache
from guardrail.engine import GuardEngine
from guardrail.video import load_video


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def engine(request, tiny_model) -> GuardEngine:
    return GuardEngine.from_pretrained(tiny_model(request.param))


@pytest.fixture(scope="module")
def clips(video_files):
    return [load_video(video_files[f]).clips[0] for f in ("mp4_h264", "webm_vp9", "gif")]


def _scores(engine, clip) -> torch.Tensor:
    return engine.judge([clip])[0][0].scores


@pytest.mark.parametrize("layout", ["parallel", "parallel_cached", "sequential"])
@pytest.mark.parametrize("mode", ["kv", "pre_prefill"])
def test_keep_ratio_one_is_no_pruning(engine, clips, layout, mode):
    base = engine.with_config(layout=layout)
    # a ratio just below 1 runs the whole pruning path but keeps every token
    pruned = base.with_config(keep_ratio=1 - 1e-9, pruning_mode=mode)
    res = pruned.judge([clips[0]])[0][0]
    assert res.kept_tokens == res.total_tokens
    assert torch.allclose(res.scores, _scores(base, clips[0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["parallel", "parallel_cached"])
@pytest.mark.parametrize("mode", ["kv", "pre_prefill"])
def test_quarter_keep_ratio(engine, clips, layout, mode):
    base = engine.with_config(layout=layout)
    pruned = base.with_config(keep_ratio=0.25, pruning_mode=mode)
    results, batch = pruned.judge([clips[0]])
    res = results[0]
    assert res.kept_tokens == math.ceil(0.25 * res.total_tokens)
    assert (res.scores - _scores(base, clips[0])).abs().max() > 1e-6
    # evicted video tokens are really gone from every layer of the cache
    item = batch.items[0]
    cached_video = int(item.visual[batch.slots[0]].sum())
    assert cached_video == res.kept_tokens
    for layer in batch.cache.layers:
        assert layer.keys.shape[-2] == layer.values.shape[-2] == batch.slots.shape[1]
    assert batch.slots.shape[1] == item.probe_start - (res.total_tokens - res.kept_tokens)


def test_verdict_reports_pruning(engine, video_files):
    v = engine.with_config(keep_ratio=0.25).check(video_files["mp4_h264"])
    assert v.pruning.keep_ratio == 0.25
    assert v.pruning.kept_tokens == math.ceil(0.25 * v.pruning.total_tokens)


def test_warm_chunk_cache_equals_cold(engine, clips):
    cold = engine.with_config(layout="parallel_cached")
    cold.chunks.clear()
    first = [_scores(cold, c) for c in clips]
    misses = cold.chunks.stats.misses
    assert len(cold.chunks) == 1 + len(engine.policies.categories)     # S + one per chunk
    hits = cold.chunks.stats.hits
    warm = [_scores(cold, c) for c in clips]
    assert cold.chunks.stats.misses == misses and cold.chunks.stats.hits > hits
    for a, b in zip(first, warm, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
    # and the cache changes nothing against encoding everything in one pass
    uncached = engine.with_config(layout="parallel_cached", chunk_cache=False)
    for a, c in zip(first, clips, strict=True):
        assert torch.allclose(a, _scores(uncached, c), atol=1e-5, rtol=0)


def test_chunk_cache_reuses_unchanged_chunks(engine, clips):
    eng = engine.with_config(layout="parallel_cached")
    eng.chunks.clear()
    _scores(eng, clips[0])
    cats = list(eng.policies.categories)
    cats[2] = cats[2].model_copy(update={"blocked": [*cats[2].blocked, "Anything else."]})
    edited = eng.with_policies(eng.policies.model_copy(update={"categories": cats}))
    misses = eng.chunks.stats.misses
    _scores(edited, clips[0])
    assert eng.chunks.stats.misses == misses + 1                       # only the edited chunk


def test_bounded_chunk_cache_still_correct(engine, clips):
    tight = GuardEngine(engine.adapter, engine.policies,
                        engine.with_config(layout="parallel_cached").config,
                        ChunkCache(max_bytes=1))                       # nothing fits
    want = _scores(engine.with_config(layout="parallel_cached", chunk_cache=False), clips[0])
    assert torch.allclose(_scores(tight, clips[0]), want, atol=1e-5, rtol=0)
    assert len(tight.chunks) == 0


@pytest.mark.parametrize("layout", ["parallel", "parallel_cached"])
def test_batched_equals_single(engine, video_files, layout):
    eng = engine.with_config(layout=layout, batch_size=8)
    paths = [video_files["mp4_h264"], video_files["gif"], video_files["mp4_h264"],
             video_files["avi_mjpeg"]]
    batched = eng.check_batch(paths)
    single = [eng.check(p) for p in paths]
    for b, s in zip(batched, single, strict=True):
        for cb, cs in zip(b.categories, s.categories, strict=True):
            assert cb.score == pytest.approx(cs.score, abs=1e-4)
    assert [c.score for c in batched[0].categories] == pytest.approx(
        [c.score for c in batched[2].categories], abs=1e-6)


def test_batched_with_pruning_and_windows(engine, video_files, long_video):
    from guardrail.video import SamplingConfig

    eng = engine.with_config(keep_ratio=0.5, batch_size=3,
                             sampling=SamplingConfig(num_frames=4, window_s=10.0))
    batched = eng.check_batch([long_video, video_files["mp4_h264"]])
    single = [eng.check(long_video), eng.check(video_files["mp4_h264"])]
    for b, s in zip(batched, single, strict=True):
        assert b.pruning == s.pruning
        assert [c.score for c in b.categories] == pytest.approx(
            [c.score for c in s.categories], abs=1e-4)


@pytest.mark.slow
def test_flex_attention_backend_matches_sdpa(tiny_model, video_files):
    """The FlexAttention block-mask path (the GPU backend) gives sdpa's scores. Slow on CPU:
    flex compiles once per shape."""
    path = tiny_model("qwen2_5_vl")
    clip = load_video(video_files["mp4_h264"]).clips[0]
    sdpa = GuardEngine.from_pretrained(path, layout="parallel", keep_ratio=0.5)
    flex = GuardEngine.from_pretrained(path, layout="parallel", keep_ratio=0.5,
                                       attn="flex_attention")
    a, b = sdpa.judge([clip])[0][0], flex.judge([clip])[0][0]
    assert a.kept_tokens == b.kept_tokens
    assert torch.allclose(a.scores, b.scores, atol=1e-4, rtol=0)
