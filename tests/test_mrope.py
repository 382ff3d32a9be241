"""mRoPE positions from each Qwen-VL family's reference formula (guardrail.adapters.mrope),
against the original release's loop written out in tests/rope_reference.py and against numbers
worked out by hand from the published formula. Nothing here reads transformers' rope index, so
the same expectations hold on any installed transformers version."""

from __future__ import annotations

import pytest
import torch
from rope_reference import original_positions

from guardrail.adapters.mrope import MRope, mrope_positions

START, END, IMAGE, VIDEO, TEXT = 900, 901, 902, 903, 7


def _sequence(blocks: list[tuple[str, tuple[int, int, int]]], family: str, merge: int = 2,
              text: int = 3) -> tuple[list[int], torch.Tensor]:
    """Token ids and types of `text` text tokens, then per block <start> pads <end> + text.
    Qwen3-VL videos: one <start> pads <end> per frame, after a timestamp text token."""
    ids, types = [TEXT] * text, [0] * text
    for kind, (t, h, w) in blocks:
        per = (h // merge) * (w // merge)
        pad = IMAGE if kind == "image" else VIDEO
        frames = [(1, per)] * t if (family == "qwen3_vl" and kind == "video") else [(t, per)]
        for ft, n in frames:
            if family == "qwen3_vl" and kind == "video":
                ids, types = ids + [TEXT], types + [0]          # the frame's "<t seconds>"
            ids += [START] + [pad] * (ft * n) + [END]
            types += [0] + [1 if kind == "image" else 2] * (ft * n) + [0]
        ids, types = ids + [TEXT] * text, types + [0] * text
    return ids, torch.tensor(types)


def _check(family, blocks, seconds=(), tps=2.0):
    ids, types = _sequence(blocks, family)
    images = [g for k, g in blocks if k == "image"]
    videos = [g for k, g in blocks if k == "video"]
    got = mrope_positions(types, MRope(family, 2, tps), image_grids=images, video_grids=videos,
                          second_per_grid=seconds)
    want = original_positions(ids, family, vision_start=START, image_token=IMAGE,
                              video_token=VIDEO, image_grids=images, video_grids=videos,
                              second_per_grid=seconds, tokens_per_second=tps)
    assert torch.equal(got, want)
    return got


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("blocks,seconds", [
    ([("video", (4, 8, 12))], (0.5,)),                  # short window: 8 frames over 2 s
    ([("video", (4, 16, 16))], (15.0,)),                # 8 frames sampled over 60 s
    ([("video", (4, 4, 4))], (2.5,)),                   # 0.8 sampled fps: fractional
    ([("image", (1, 6, 4))], ()),                       # a one-frame image
    ([("image", (1, 4, 4)), ("video", (4, 4, 8))], (1.25,)),
])
def test_matches_the_original_loop(family, blocks, seconds):
    _check(family, blocks, seconds)


def test_qwen2_5_long_sparse_window_by_hand():
    """8 frames over 60 s: 4 temporal patches of 15 s at 2 tokens per second -> temporal ids
    0, 30, 60, 90 after the start; the next text sits at the largest used position + 1."""
    pos = _check("qwen2_5_vl", [("video", (4, 4, 4))], (15.0,))     # grid t: 8 frames / 2
    video = torch.tensor(_sequence([("video", (4, 4, 4))], "qwen2_5_vl")[0]).eq(VIDEO)
    first = 4                                      # 3 text tokens + <vision_start>
    assert pos[0, video].unique().tolist() == [first, first + 30, first + 60, first + 90]
    end = int(video.nonzero().max()) + 1          # <vision_end>
    assert pos[:, end].tolist() == [first + 91] * 3


def test_qwen2_5_fractional_interval_quantised_after_the_multiply():
    """2.5 s per temporal patch (0.8 sampled fps) x 2 tokens/s = 5 per patch; 1.25 s x 2 = 2.5
    per patch, truncated after the multiply: 0, 2, 5, 7 (not 0, 2, 4, 6 from a truncated 1 s)."""
    pos = _check("qwen2_5_vl", [("video", (4, 2, 2))], (1.25,))
    ids, _ = _sequence([("video", (4, 2, 2))], "qwen2_5_vl")
    video = torch.tensor(ids).eq(VIDEO)
    assert (pos[0, video] - 4).tolist() == [0, 2, 5, 7]


def test_qwen2_text_after_video_starts_after_largest_row():
    """Qwen2-VL: t, h, w ids 0..3 on a 4 x 4 x 4 grid (merged 2 x 2): the last video token
    sits at start + 3 on the temporal row, so <vision_end> is start + 4, not start + max(h,w)."""
    pos = _check("qwen2_vl", [("video", (4, 4, 4))])
    ids, _ = _sequence([("video", (4, 4, 4))], "qwen2_vl")
    end = ids.index(END)
    assert pos[:, end].tolist() == [4 + 4] * 3


def test_engine_video_positions_follow_the_formula(tiny_model, video_files):
    """The adapter's video segment (the official processor's tokens) gets the formula's
    positions, for every Qwen-VL family and a real clip."""
    from guardrail.adapters.qwen_vl import clip_metadata
    from guardrail.engine import GuardEngine
    from guardrail.video import load_video

    clip = load_video(video_files["mp4_h264"]).clips[0]
    for family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        adapter = GuardEngine.from_pretrained(tiny_model(family)).adapter
        vi = adapter.video_inputs(clip)
        cfg = adapter.model.config
        meta = clip_metadata(clip)
        fps = len(meta.frames_indices) / meta.total_num_frames * meta.fps
        ids = [*vi.ids.tolist(), TEXT]
        want = original_positions(
            ids, family, vision_start=cfg.vision_start_token_id,
            image_token=cfg.image_token_id, video_token=cfg.video_token_id,
            video_grids=vi.encoder_inputs["video_grid_thw"].tolist(),
            second_per_grid=(2 / fps,), tokens_per_second=2.0)
        assert torch.equal(vi.rel_pos, want[:, :-1]), family
        assert vi.advance == int(want[0, -1]), family
