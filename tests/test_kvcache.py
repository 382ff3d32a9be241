"""The runner's KV cache: allocated once per batch and written in place (no `torch.cat` of the
cache per decode step, no buffer growing in the engine's flows), rows in step decoded with no
mask at all, rows out of step decoded with a mask built from their columns and without copying
K/V per query head. Outputs equal to decoding each row alone are in test_batches.py; these
tests count what a step does, as test_device.py counts tensor factories."""

from __future__ import annotations

import pytest
import torch
import transformers.integrations.sdpa_attention as sdpa_module
import videos
from torch.overrides import TorchFunctionMode
from transformers import DynamicCache

from guardrail.adapters.attention import folded_sdpa
from guardrail.decode import opener
from guardrail.engine import GuardEngine
from guardrail.kvcache import SlotLayer
from guardrail.layout import additive_mask
from guardrail.runner import Batch, batch_from_rows
from guardrail.video import SamplingConfig, load_video

CATS = {torch.cat, torch.concat, torch.concatenate}


class CacheCatAudit(TorchFunctionMode):
    """Records every concatenation of 4-D tensors along their third dimension ([B, H, T, D]:
    the sequence of a KV cache) while active. (RoPE's rotate_half concatenates new tokens'
    queries and keys along the last one; not counted.)"""

    def __init__(self):
        super().__init__()
        self.found: list[tuple] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in CATS:
            tensors = args[0] if args else kwargs.get("tensors", ())
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if any(t.dim() == 4 for t in tensors) and dim in (2, -2):
                self.found.append(tuple(tuple(t.shape) for t in tensors))
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def engine(tiny_model) -> GuardEngine:
    eng = GuardEngine.from_pretrained(tiny_model("qwen2_5_vl"))
    lm = eng.adapter.model.config.get_text_config()
    assert lm.num_attention_heads > lm.num_key_value_heads      # grouped-query attention
    return eng


@pytest.fixture(scope="module")
def two_sizes(video_files, tmp_path_factory):
    """Two videos whose windows give different token counts (ragged rows)."""
    data = videos.encode_video("mp4_h264", num_frames=30, fps=10, width=160, height=128)
    big = videos.write(tmp_path_factory.mktemp("sizes"), "big.mp4", data)
    return [load_video(video_files["mp4_h264"]),
            load_video(big, SamplingConfig(num_frames=4))]


def test_the_audit_sees_a_growing_cache():
    """The audit below can fail: a DynamicCache step is a concatenation it records."""
    cache = DynamicCache()
    with CacheCatAudit() as audit:
        for _ in range(2):
            cache.update(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4), 0)
    assert audit.found


@pytest.mark.parametrize("config", [
    {"layout": "sequential"}, {"layout": "parallel", "keep_ratio": 0.5},
    {"layout": "parallel_cached"}])
def test_decoding_writes_the_cache_in_place(engine, two_sizes, config, monkeypatch):
    """Explain mode over ragged rows: no decode step concatenates cache tensors, every step
    writes into the buffers the batch was made with, and no buffer ever grew."""
    eng = engine.with_config(mode="explain", max_new_tokens=12, **config)
    grew, steps, buffers = [], [], set()
    real_grow, real_extend = SlotLayer.grow, Batch.extend

    def grow(self, capacity):
        grew.append(capacity)
        real_grow(self, capacity)

    def extend(self, new):
        before = [(layer.k_buf.data_ptr(), layer.v_buf.data_ptr()) for layer in self.cache.layers]
        with CacheCatAudit() as audit:
            out = real_extend(self, new)
        after = [(layer.k_buf.data_ptr(), layer.v_buf.data_ptr()) for layer in self.cache.layers]
        steps.append(audit.found)
        assert before == after
        buffers.add(before[0])
        return out

    monkeypatch.setattr(SlotLayer, "grow", grow)
    monkeypatch.setattr(Batch, "extend", extend)
    verdicts = eng.check_batch([*two_sizes, two_sizes[0]])
    assert all(v.description is not None for v in verdicts)
    assert len(steps) > 5 and not any(steps), steps
    assert len(buffers) == 1                          # one explain batch: one allocation
    assert not grew


def _explain_batch(eng: GuardEngine, clips: list, room: int = 64) -> tuple[Batch, list[int]]:
    """A batch of the windows' prompt caches ready to decode, and their answer positions."""
    _, judged = eng.judge(clips)
    rows = [eng._explain_input(judged, b) for b in range(len(clips))]
    batch = batch_from_rows(eng.adapter, rows, room=room)
    next_pos = [int(item.layout.positions[0, item.probe_start]) for item, _, _ in rows]
    batch.answer(next_pos)
    return batch, next_pos


class _Masks:
    """Counts the masks the attention backend is asked to build, and K/V copies per head."""

    def __init__(self, eng: GuardEngine, monkeypatch):
        self.built, self.repeated = [], 0
        capture = eng.adapter.capture
        real_mask, real_repeat = capture.mask, sdpa_module.repeat_kv

        def mask(visible, dtype, batch):
            self.built.append(visible)
            return real_mask(visible, dtype, batch)

        def repeat(hidden, n_rep):
            self.repeated += n_rep > 1
            return real_repeat(hidden, n_rep)

        monkeypatch.setattr(capture, "mask", mask)
        monkeypatch.setattr(sdpa_module, "repeat_kv", repeat)


def test_rows_in_step_decode_with_no_mask(engine, video_files, monkeypatch):
    eng = engine.with_config(layout="parallel")
    clip = load_video(video_files["mp4_h264"]).clips[0]
    batch, _ = _explain_batch(eng, [clip, clip])
    masks = _Masks(eng, monkeypatch)
    start = opener(eng.adapter.encode_text)
    batch.extend([start, start])                      # several tokens per row, rows in step
    for t in (5, 9, 11):
        batch.extend([[t], [t]])
    assert batch.lengths[0] == batch.lengths[1]
    assert masks.built == [] and masks.repeated == 0


def test_rows_out_of_step_decode_like_each_row_alone(engine, two_sizes, monkeypatch):
    """Ragged rows (different prompts, then different numbers of tokens per step): each step's
    mask comes from the rows' columns, K/V are never copied per query head, and every row's
    hidden states are those of the row decoded alone."""
    eng = engine.with_config(layout="parallel")
    clips = [v.clips[0] for v in two_sizes]
    # the second row's prompt is the longer one; the step after it gets one token while the
    # first gets three, so the keys the step reads end short of (previous width + 3)
    feeds = [[[3, 4, 5], [3]], [[6], [7, 8]], [[], [9]], [[10, 12, 14], [11]], [[1], [2]]]
    batch, _ = _explain_batch(eng, clips, room=512)
    assert 0 < batch.lengths[1] - batch.lengths[0] < 400
    masks = _Masks(eng, monkeypatch)
    together = [batch.extend(feed) for feed in feeds]                 # [B, D] per step
    # last, a step from different columns that leaves both rows the same length: still a mask
    gap = batch.lengths[1] - batch.lengths[0]
    feeds.append([[5] * (gap + 1), [6]])
    together.append(batch.extend(feeds[-1]))
    assert batch.lengths[0] == batch.lengths[1]
    assert len(masks.built) == len(feeds) and masks.repeated == 0
    for vis in masks.built:                           # the columns' form: no group, no segment
        assert not vis.q_group.any() and not vis.k_group.any()
    for b, clip in enumerate(clips):
        alone, _ = _explain_batch(eng, [clip], room=512)
        for step, feed in enumerate(feeds):
            if feed[b]:
                hidden = alone.extend([feed[b]])[0]
                assert torch.allclose(together[step][b], hidden, atol=1e-5, rtol=0)


def test_the_columns_rule_is_the_layouts_rule(engine, two_sizes, monkeypatch):
    """Where a step's queries all see their whole row (sequential prompts, answer tokens), the
    mask from the columns equals the layout's group/segment rule, for every step of a ragged,
    pruned, explained batch."""
    checked = []
    real = Batch._own_columns

    def own_columns(self, q, at, k, causal):
        vis = real(self, q, at, k, causal)
        dense = vis.dense()
        assert torch.equal(dense, self._visibility(q, k).dense())
        if causal:                                    # the backend will use bottom-right causal
            n, width = dense.shape[1:]
            assert torch.equal(dense, torch.ones(n, width, dtype=torch.bool).tril(width - n)
                               .expand_as(dense))
        checked.append(causal)
        return vis

    monkeypatch.setattr(Batch, "_own_columns", own_columns)
    for config in ({"layout": "sequential", "keep_ratio": 0.5}, {"layout": "parallel"}):
        eng = engine.with_config(mode="explain", max_new_tokens=10, **config)
        eng.check_batch(two_sizes)
        eng.check_batch([two_sizes[0], two_sizes[0]])
    assert True in checked and False in checked       # rows in step and out of step


@pytest.mark.parametrize("mask_rows", [1, 3])
@pytest.mark.parametrize("n", [1, 4])
def test_folded_sdpa_equals_attention_over_repeated_heads(n, mask_rows):
    torch.manual_seed(0)
    b, h, h_kv, k_len, d = 3, 6, 2, 17, 8
    q = torch.randn(b, h, n, d)
    k, v = torch.randn(b, h_kv, k_len, d), torch.randn(b, h_kv, k_len, d)
    ends = torch.tensor([9, 17, 12])[:mask_rows, None, None]          # ragged rows
    cols = torch.arange(k_len)[None, None]
    own = torch.arange(n)[None, :, None] + ends - n                   # each row causal
    visible = (cols < ends) & (cols <= own)
    mask = additive_mask(visible, torch.float32)                      # [rows, 1, n, K]
    got, _ = folded_sdpa(q, k, v, mask, 0.3)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, sdpa_module.repeat_kv(k, h // h_kv), sdpa_module.repeat_kv(v, h // h_kv),
        attn_mask=mask, scale=0.3).transpose(1, 2)
    assert got.shape == (b, n, h, d)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


def test_a_waiting_rows_padding_needs_no_room(engine, two_sizes):
    """The longest row has used all its answer room and waits while a shorter row feeds a
    block longer than the longest row's headroom: the padding of the waiting row goes to the
    spare column, so nothing grows, and the fed row decodes as it does alone."""
    eng = engine.with_config(layout="parallel")
    clips = [v.clips[0] for v in two_sizes]
    probe = _explain_batch(eng, clips)[0].items[1]
    room = probe.layout.length - probe.probe_start + 10     # more than the headroom
    batch, _ = _explain_batch(eng, clips, room=room)
    assert batch.lengths[1] > batch.lengths[0]
    batch.extend([[], [4] * room])                          # the long row fills its room
    block = [5] * room
    got = batch.extend([block, []])[0]                      # the short row: a long block
    assert batch.grown == 0
    alone, _ = _explain_batch(eng, clips[:1], room=room)
    assert torch.allclose(got, alone.extend([block])[0], atol=1e-5, rtol=0)
