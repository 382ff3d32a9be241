"""The Qwen-VL vision towers' one-call attention equals transformers' per-piece loop, and makes
one attention call per vision block for the whole batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import videos
from torch.overrides import TorchFunctionMode
from transformers import AutoModelForImageTextToText

from guardrail.adapters.registry import create_adapter
from guardrail.adapters.vision_attention import _plan, packed_attention
from guardrail.video import SamplingConfig, load_video


class _CountAttention(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def _loop(q, k, v, cu, scale):
    """Per-piece attention, the way transformers' sdpa path does it."""
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        piece = [x[a:b].transpose(0, 1)[None] for x in (q, k, v)]          # [1, H, n, D]
        outs.append(F.scaled_dot_product_attention(*piece, scale=scale)[0].transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("lengths", [[64, 64, 64], [1, 64, 17, 3], [40], [5, 0, 9]])
def test_packed_attention_equals_per_piece(lengths):
    torch.manual_seed(0)
    s, h, d = sum(lengths), 3, 8
    q, k, v = (torch.randn(s, h, d) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    got = packed_attention(q, k, v, _plan(cu, s), 0.3)
    assert torch.allclose(got, _loop(q, k, v, cu, 0.3), atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def clips(video_files, tmp_path_factory):
    big = videos.write(tmp_path_factory.mktemp("vision"), "big.mp4", videos.encode_video(
        "mp4_h264", num_frames=30, fps=10, width=160, height=128))
    return [load_video(video_files["mp4_h264"]).clips[0],
            load_video(big, SamplingConfig(num_frames=4)).clips[0]]


def _towers(path):
    adapter = create_adapter(path)
    plain = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32,
                                                        attn_implementation="sdpa").eval()
    return adapter, plain


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_tower_equals_transformers_and_calls_once_per_block(tiny_model, clips, family):
    adapter, plain = _towers(tiny_model(family))
    inputs = [adapter.video_inputs(c) for c in clips]
    pixels = torch.cat([i.encoder_inputs["pixel_values_videos"] for i in inputs])
    grid = torch.cat([i.encoder_inputs["video_grid_thw"] for i in inputs])
    counts = {}
    outs = {}
    for name, model in (("ours", adapter.model), ("transformers", plain)):
        with torch.inference_mode(), _CountAttention() as mode:
            out = model.model.get_video_features(pixels, grid, return_dict=True)
        counts[name] = mode.calls
        outs[name] = [out.pooler_output, *(getattr(out, "deepstack_features", None) or ())]
    for ours, theirs in zip(outs["ours"], outs["transformers"], strict=True):
        ours, theirs = (torch.cat(list(x)) if isinstance(x, (list, tuple)) else x
                        for x in (ours, theirs))
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)
    blocks = len(adapter.model.model.visual.blocks)
    assert counts["ours"] == blocks                     # one call per block, both clips at once
    assert counts["transformers"] > blocks              # per frame / per window before
