"""Batches as users send them: videos of different sizes in one batch (ragged rows), explain
text decoded for a batch, and bf16 weights. Each must give what judging a video alone gives."""

from __future__ import annotations

import pytest
import torch
import videos

from guardrail.engine import GuardEngine
from guardrail.video import SamplingConfig, load_video

PRUNING = {"off": {}, "kv": {"keep_ratio": 0.5},
           "pre_prefill": {"keep_ratio": 0.5, "pruning_mode": "pre_prefill"}}


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl", "internvl"])
def engine(request, tiny_model) -> GuardEngine:
    return GuardEngine.from_pretrained(tiny_model(request.param))


@pytest.fixture(scope="module")
def two_sizes(video_files, tmp_path_factory):
    """Two videos whose windows give different token counts: 8 frames of 64x48, and 4 frames of
    160x128 (fewer frames for every family, more pixels per frame for the Qwen families)."""
    data = videos.encode_video("mp4_h264", num_frames=30, fps=10, width=160, height=128)
    big = videos.write(tmp_path_factory.mktemp("sizes"), "big.mp4", data)
    return [load_video(video_files["mp4_h264"]),
            load_video(big, SamplingConfig(num_frames=4))]


@pytest.mark.parametrize("pruning", list(PRUNING))
@pytest.mark.parametrize("layout", ["sequential", "parallel", "parallel_cached"])
def test_ragged_batch_equals_single(engine, two_sizes, layout, pruning):
    eng = engine.with_config(layout=layout, **PRUNING[pruning])
    clips = [v.clips[0] for v in two_sizes]
    batched, _ = eng.judge(clips)
    assert batched[0].total_tokens != batched[1].total_tokens       # the rows really are ragged
    for clip, row in zip(clips, batched, strict=True):
        alone = eng.judge([clip])[0][0]
        assert (row.kept_tokens, row.total_tokens) == (alone.kept_tokens, alone.total_tokens)
        assert torch.allclose(row.scores, alone.scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["sequential", "parallel", "parallel_cached"])
def test_batched_explain_equals_single(engine, two_sizes, layout):
    eng = engine.with_config(layout=layout, mode="explain", max_new_tokens=18)
    batched = eng.check_batch([*two_sizes, two_sizes[0]])
    for video, got in zip([*two_sizes, two_sizes[0]], batched, strict=True):
        alone = eng.check(video)
        assert (got.description, got.explanation) == (alone.description, alone.explanation)
        assert [c.score for c in got.categories] == pytest.approx(
            [c.score for c in alone.categories], abs=1e-5)
    assert batched[0].description                                     # text was generated


# bf16 on the CPU against fp32, measured on the tiny models of three families, every layout, with
# and without pruning: scores moved by at most 0.0114 and the kept tokens never changed. A wrong
# score (P(false), swapped answer ids) moves them by 0.3 or more.
BF16_TOLERANCE = 0.03


@pytest.mark.parametrize("family", ["qwen2_5_vl", "internvl"])
@pytest.mark.parametrize("layout", ["parallel", "parallel_cached"])
def test_bf16_scores_within_tolerance_of_fp32(tiny_model, video_files, family, layout):
    path = tiny_model(family)
    clip = load_video(video_files["mp4_h264"]).clips[0]
    fp32 = GuardEngine.from_pretrained(path, layout=layout, keep_ratio=0.5)
    bf16 = GuardEngine.from_pretrained(path, layout=layout, keep_ratio=0.5, dtype="bf16")
    assert bf16.adapter.dtype == torch.bfloat16
    a, b = fp32.judge([clip])[0][0], bf16.judge([clip])[0][0]
    assert b.scores.dtype == torch.float32
    assert a.kept_tokens == b.kept_tokens
    assert float((a.scores - b.scores).abs().max()) <= BF16_TOLERANCE
