from __future__ import annotations

import pytest
import torch

from guardrail.errors import UsageError
from guardrail.layout import (
    Segment,
    additive_mask,
    build_groups,
    concat,
    plan,
    text_segment,
    visibility,
)


def _segs(rows=3):
    s = text_segment("S", [1, 2, 3], rows)
    # a "video": 4 tokens with 3-D ids and an advance of 2 (shorter than its length, as Qwen's is)
    rel = torch.tensor([[0, 0, 0, 0], [0, 0, 1, 1], [0, 1, 0, 1]])[:rows]
    v = Segment("V", torch.tensor([9, 9, 9, 9]), rel, 2)
    chunks = [text_segment(f"P{i}", list(range(n)), rows) for i, n in enumerate([2, 5, 3])]
    q = text_segment("Q", [7, 7], rows)
    probes = [text_segment(f"R{i}", [5, 6], rows) for i in range(3)]
    return s, v, chunks, q, probes


def _groups(layout, s, v, chunks, q, probes):
    chunk_part = [("chunk", c) for c in chunks]
    if layout == "parallel_cached":
        ordered = [("system", s), *chunk_part, ("video", v), ("question", q)]
    else:
        ordered = [("system", s), ("video", v), *chunk_part, ("question", q)]
    return build_groups(layout, ordered, probes)


def test_parallel_positions_follow_pepe():
    s, v, chunks, q, probes = _segs()
    lay = plan(_groups("parallel", s, v, chunks, q, probes))
    b = 3 + 2  # after S (3) and the video's advance (2)
    for i, c in enumerate(chunks):
        pos = lay.positions[:, lay.span(f"P{i}")]
        assert pos[0].tolist() == list(range(b, b + c.length))
        assert torch.equal(pos[0], pos[1]) and torch.equal(pos[0], pos[2])
    assert lay.positions[0, lay.span("Q")].tolist() == [b + 5, b + 6]  # b + longest chunk
    for i in range(3):
        assert lay.positions[0, lay.span(f"R{i}")].tolist() == [b + 7, b + 8]
    assert lay.next_position == b + 9
    # the video keeps its 3-D ids, shifted to its place
    assert lay.positions[:, lay.span("V")].tolist() == (_segs()[1].rel_pos + 3).tolist()


def test_sequential_positions_are_consecutive():
    s, v, chunks, q, probes = _segs(rows=1)
    lay = plan(_groups("sequential", s, v, chunks, q, probes))
    assert lay.positions[0, lay.span("P1")].tolist() == list(range(7, 12))
    assert lay.positions[0, lay.span("Q")].tolist() == [15, 16]


def test_parallel_cached_puts_chunks_before_video():
    s, v, chunks, q, probes = _segs()
    lay = plan(_groups("parallel_cached", s, v, chunks, q, probes))
    assert [x.name for x in lay.segments][:5] == ["S", "P0", "P1", "P2", "V"]
    assert lay.positions[0, lay.span("V")].min().item() == 3 + 5


def test_visibility_rule():
    s, v, chunks, q, probes = _segs()
    lay = plan(_groups("parallel", s, v, chunks, q, probes))
    idx = torch.arange(lay.length)
    vis = visibility(lay, idx, idx)
    p0, p1, qs, r0, r1 = (lay.span(n) for n in ("P0", "P1", "Q", "R0", "R1"))
    assert not vis[p1][:, p0].any() and not vis[p0][:, p1].any()  # chunks isolated
    assert vis[p1][:, : p0.start].all()                            # chunks see S and V
    assert torch.equal(vis[p1][:, p1], torch.ones(5, 5, dtype=torch.bool).tril())
    assert vis[qs][:, : qs.start].all()                            # Q sees everything before
    assert not vis[r0][:, r1].any() and vis[r0][:, : r0.start].all()
    assert not vis[:, :][idx[:, None] < idx[None, :]].any()        # never the future


def test_visibility_with_evicted_keys():
    s, v, chunks, q, probes = _segs()
    lay = plan(_groups("parallel", s, v, chunks, q, probes))
    keep = torch.tensor([0, 1, 2, 4, 6])  # drop video tokens 3 and 5
    q_idx = torch.arange(lay.span("R0").start, lay.span("R0").stop)
    vis = visibility(lay, q_idx, torch.cat([keep, q_idx]))
    assert vis.shape == (2, 7)
    assert vis[:, :5].all() and vis[:, 5:].tolist() == [[True, False], [True, True]]


def test_additive_mask():
    vis = torch.tensor([[True, False], [True, True]])
    m = additive_mask(vis, torch.float32)
    assert m.shape == (1, 1, 2, 2) and m.dtype == torch.float32
    assert m[0, 0, 0, 0] == 0 and m[0, 0, 0, 1] == torch.finfo(torch.float32).min


def test_unknown_layout():
    s, v, chunks, q, probes = _segs()
    with pytest.raises(UsageError, match="unknown layout"):
        _groups("diagonal", s, v, chunks, q, probes)


def test_concat_offsets_parts_by_advance():
    s, v, *_ = _segs()
    seg = concat("V", text_segment("a", [1, 2], 3), v, text_segment("b", [3], 3))
    assert seg.ids.tolist() == [1, 2, 9, 9, 9, 9, 3]
    assert seg.rel_pos[0].tolist() == [0, 1, 2, 2, 2, 2, 4]
    assert seg.rel_pos[1].tolist() == [0, 1, 2, 2, 3, 3, 4]
    assert seg.advance == 5


def test_visibility_padding_sees_nothing():
    s, v, chunks, q, probes = _segs()
    lay = plan(_groups("parallel", s, v, chunks, q, probes))
    vis = visibility(lay, torch.tensor([3, -1]), torch.tensor([0, -1, 1, 2, 3]))
    assert vis.tolist() == [[True, False, True, True, True], [False] * 5]


def test_flex_mask_mod_equals_dense_rule():
    """The packed FlexAttention mask_mod and the dense mask are one rule (random vectors, every
    segment inside one group as in a layout, padding included)."""
    from guardrail.layout import Visibility

    g = torch.Generator().manual_seed(0)
    b, q, k = 2, 7, 11

    def vec(n, high):
        return torch.randint(0, high, (b, n), generator=g)

    qi, ki = vec(q, 12), vec(k, 12)
    qi[0, -1], ki[1, 3] = -1, -1
    qs, ks = vec(q, 6), vec(k, 6)
    qs[0, 0], qi[0, 0], ks[0, 0], ki[0, 0] = 0, 0, 0, 0   # the very first token (code 0)
    vis = Visibility(qs // 2, qs, qi, ks // 2, ks, ki)
    mod = vis.mask_mod()
    bi = torch.arange(b)[:, None, None]
    got = mod(bi, 0, torch.arange(q)[None, :, None], torch.arange(k)[None, None, :])
    assert torch.equal(got, vis.dense())
    assert vis.dense().any() and not vis.dense().all()
