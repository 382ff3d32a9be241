"""Engine invariants (SPEC §4.2) on tiny random models of every family, fp32 on CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from guardrail.engine import GuardEngine
from guardrail.kvcache import layers
from guardrail.layout import Visibility
from guardrail.policy import load_policy
from guardrail.probes import probe_scores
from guardrail.runner import Batch, Item
from guardrail.tiny import FAMILIES
from guardrail.verdict import parse_answer
from guardrail.video import Clip, SamplingConfig, Window, load_video

POLICY_DIR = Path(__file__).resolve().parents[1] / "policies"


@pytest.fixture(scope="module", params=FAMILIES)
def engine(request, tiny_model) -> GuardEngine:
    # no policies argument: the default set, policies/safewatch.yaml
    return GuardEngine.from_pretrained(tiny_model(request.param))


@pytest.fixture(scope="module")
def clip(video_files) -> Clip:
    return load_video(video_files["mp4_h264"]).clips[0]


def _other_clip(seed: int = 1) -> Clip:
    frames = np.random.default_rng(seed).integers(0, 255, (8, 48, 64, 3), dtype=np.uint8)
    window = Window(0.0, 0.8, tuple(range(8)), tuple(i / 10 for i in range(8)))
    return Clip(window, frames, 10.0)


def _scores(engine: GuardEngine, clip: Clip) -> dict[str, float]:
    res = engine.judge([clip])[0][0]
    return dict(zip([c.id for c in engine.policies.categories], res.scores.tolist(), strict=True))


def _reordered(engine: GuardEngine, order: list[int]) -> GuardEngine:
    cats = engine.policies.categories
    return engine.with_policies(
        engine.policies.model_copy(update={"categories": [cats[i] for i in order]}))


@pytest.mark.parametrize("layout", ["parallel", "parallel_cached", "isolated"])
def test_order_invariance(engine, clip, layout):
    base = engine.with_config(layout=layout)
    want = _scores(base, clip)
    for order in ([5, 4, 3, 2, 1, 0], [2, 0, 5, 1, 4, 3]):
        got = _scores(_reordered(base, order), clip)
        assert max(abs(got[k] - want[k]) for k in want) <= 1e-4


def test_isolated_safewatch_style_is_order_invariant(engine, clip):
    base = engine.with_config(layout="isolated", prompt_style="safewatch")
    want = _scores(base, clip)
    got = _scores(_reordered(base, [5, 4, 3, 2, 1, 0]), clip)
    assert max(abs(got[k] - want[k]) for k in want) <= 1e-4


def test_sequential_depends_on_order(engine, clip):
    base = engine.with_config(layout="sequential")
    want, got = _scores(base, clip), _scores(_reordered(base, [5, 4, 3, 2, 1, 0]), clip)
    assert max(abs(got[k] - want[k]) for k in want) > 1e-4


def test_parallel_equals_stitched_per_chunk_caches(engine, clip):
    """One PEPE pass == encode [S V P_i] alone for each i with a plain causal mask, stitch the
    KV caches in layout order, then run Q and the probes over the stitched cache."""
    eng = engine.with_config(layout="parallel")
    adapter = eng.adapter
    video = adapter.video_inputs(clip)
    feats = adapter.visual_features(video)
    lay, visual = eng.layout(video)
    one_pass = eng.judge([clip])[0][0].scores

    prefix_end = lay.span("P0").start
    spans = [lay.span(f"P{i}") for i in range(len(eng.tokens.probes))]
    caches = []
    for span in spans:
        idx = torch.cat([torch.arange(prefix_end), torch.arange(span.start, span.stop)])
        cache = adapter.new_cache()
        embeds = adapter.embed(lay.ids[idx]).clone()
        embeds[visual[idx]] = feats.embeds
        n = idx.numel()
        causal = Visibility.causal_step(n, 0, adapter.device)
        adapter.forward(embeds[None], lay.positions[:, idx][:, None], causal, cache,
                        visual[idx][None], feats.deepstack)
        caches.append(layers(cache))
    stitched = [(torch.cat([k] + [c[li][0][..., prefix_end:, :] for c in caches[1:]], dim=-2),
                 torch.cat([v] + [c[li][1][..., prefix_end:, :] for c in caches[1:]], dim=-2))
                for li, (k, v) in enumerate(caches[0])]
    q = lay.span("Q")
    batch = Batch(adapter, [Item(lay, visual, feats)])
    batch.load(torch.arange(q.start)[None], [stitched])
    batch.step([torch.arange(q.start, q.stop)])
    probe_start = q.stop
    hidden, _ = batch.step([torch.arange(probe_start, lay.length)])
    last = [lay.span(f"R{i}").stop - 1 - probe_start for i in range(len(spans))]
    logits = adapter.logits(hidden[0, last])
    stitched_scores = probe_scores(logits[:, [eng.answer.true_id, eng.answer.false_id]])
    assert torch.allclose(one_pass, stitched_scores, atol=1e-4, rtol=0)


def test_deterministic_and_video_sensitive(engine, clip):
    a, b = _scores(engine, clip), _scores(engine, clip)
    assert a == b
    c = _scores(engine, _other_clip())
    assert max(abs(a[k] - c[k]) for k in a) > 1e-5


def test_fast_mode_generates_nothing_and_flags_follow_thresholds(engine, video_files):
    v = engine.check(video_files["mp4_h264"])
    assert v.mode == "fast" and v.description is None and v.explanation is None
    assert v.timing_ms.generate == 0.0
    for c in v.categories:
        assert c.flagged == (c.score >= c.threshold)
        assert 0.0 <= c.score <= 1.0
    assert v.flagged == any(c.flagged for c in v.categories)
    assert [c.id for c in v.categories] == ["C1", "C2", "C3", "C4", "C5", "C6"]
    assert v.video.frames_used == 8 and v.pruning.kept_tokens == v.pruning.total_tokens > 0


def test_thresholds_from_the_policy(engine, clip, video_files):
    scores = _scores(engine, clip)
    cats = engine.policies.categories
    # put each threshold just above or just below its score, alternately
    updated = [c.model_copy(update={"threshold": min(max(scores[c.id] + (1e-3 if i % 2 else -1e-3),
                                                         1e-6), 1 - 1e-6)})
               for i, c in enumerate(cats)]
    eng = engine.with_policies(engine.policies.model_copy(update={"categories": updated}))
    v = eng.check(video_files["mp4_h264"])
    assert [c.flagged for c in v.categories] == [i % 2 == 0 for i in range(len(cats))]


@pytest.mark.parametrize("layout", ["parallel", "isolated"])
@pytest.mark.parametrize("mode", ["explain", "explain_flagged"])
def test_explain_mode_always_parses(engine, video_files, mode, layout):
    eng = engine.with_config(mode=mode, max_new_tokens=12, layout=layout)
    v = eng.check(video_files["mp4_h264"])
    if mode == "explain_flagged" and not v.flagged:
        assert v.description is None
        return
    assert v.description is not None and v.explanation is not None
    assert "\n" not in v.description and "\n" not in v.explanation
    _, batch = eng.judge([load_video(video_files["mp4_h264"]).clips[0]])
    texts, _ = eng._explain([(batch.items[0], *batch.row(0))], [[c.flagged for c in v.categories]])
    text = texts[0].text
    parsed = parse_answer(text, [(c.id, c.name) for c in eng.policies.categories])
    assert parsed.ok
    assert parsed.flags == {c.id: c.flagged for c in v.categories}


def test_long_video_is_judged_in_windows(engine, long_video):
    eng = engine.with_config(sampling=SamplingConfig(num_frames=4, window_s=10.0))
    v = eng.check(long_video)
    assert len(v.segments) == 4
    assert [(s.start_s, s.end_s) for s in v.segments] == [(0, 10), (10, 20), (20, 30), (30, 40)]
    for c in v.categories:
        assert c.score == pytest.approx(max(s.scores[c.id] for s in v.segments))


def test_progress_is_reported_per_window_then_per_explained_video(engine, long_video):
    eng = engine.with_config(sampling=SamplingConfig(num_frames=4, window_s=10.0), batch_size=3,
                             mode="explain_flagged", max_new_tokens=4)
    seen = []
    verdicts = eng.check_batch([long_video, long_video], progress=lambda *a: seen.append(a))
    judging = [a for a in seen if a[0] == "judging"]
    assert judging == [("judging", n, 8) for n in (3, 6, 8)]          # 8 windows, 3 per batch
    explained = sum(v.flagged for v in verdicts)
    explaining = [a for a in seen if a[0] == "explaining"]
    assert explaining == ([("explaining", 0, explained), ("explaining", explained, explained)]
                          if explained else [])
    assert seen.index(judging[-1]) < (seen.index(explaining[0]) if explaining else len(seen))


def test_policy_file_loaded_by_default_is_safewatch(engine):
    assert engine.policies == load_policy(POLICY_DIR / "safewatch.yaml")


def test_calibration_file_is_applied(engine, clip, tmp_path):
    from guardrail.calibration import fit, save

    ids = [c.id for c in engine.policies.categories]
    rng = np.random.default_rng(0)
    raw = rng.uniform(0.3, 0.7, size=(200, len(ids)))
    labels = (rng.uniform(size=raw.shape) < 0.2).astype(int)
    cal = fit(raw, labels, ids, "platt")
    path = save(cal, tmp_path / "cal.json")
    calibrated = GuardEngine.from_pretrained(engine.adapter.name, calibration=str(path))
    raw_scores = np.array(list(_scores(engine, clip).values()))
    got = np.array(list(_scores(calibrated, clip).values()))
    assert np.allclose(got, cal.apply_many(ids, raw_scores), atol=1e-6)
    assert np.abs(got - raw_scores).max() > 1e-3            # calibration really moved them


def test_causal_fast_path_equals_explicit_mask(engine, monkeypatch):
    """Where visibility is plain causal over the cache (sequential prefills, decode steps) the
    adapter lets the backend build its own causal mask; that must equal the explicit mask,
    including new tokens that follow a cache (bottom-right aligned)."""
    adapter = engine.adapter
    ids = torch.arange(5, 45)
    pos = torch.arange(40).expand(adapter.rows, 1, -1)

    def run():
        cache = adapter.new_cache()
        adapter.forward(adapter.embed(ids[:30])[None], pos[..., :30],
                        Visibility.causal_step(30, 0, adapter.device), cache)
        visible = Visibility.causal_step(10, 30, adapter.device)
        return adapter.forward(adapter.embed(ids[30:])[None], pos[..., 30:], visible, cache)

    fast = run()
    explicit = type(adapter)._mask
    monkeypatch.setattr(type(adapter), "_mask", lambda self, visible, batch: self.capture.mask(
        visible, self.dtype, batch))
    slow = run()
    monkeypatch.setattr(type(adapter), "_mask", explicit)
    assert torch.allclose(fast, slow, atol=1e-5, rtol=0)
