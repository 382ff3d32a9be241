"""`EnginePool.run_batch` on a real tiny engine: one `check_batch` per group of equal settings,
outputs in input order, and the one-by-one fallback when a batch fails.

The reference for every verdict is the same engine judging that video alone; `check_batch` is
spied on (called through, never replaced) to see how the pool grouped the work.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import videos

from guardrail.engine import GuardEngine
from guardrail.errors import UsageError
from guardrail.policy import load_policy_text
from guardrail.serve.judge import EnginePool, InternalError, JudgeRequest, Work
from guardrail.verdict import Verdict
from guardrail.video import Video
from guardrail.video.loader import load_video
from guardrail.video.types import SamplingConfig

POLICY = """name: tiny-set
version: 1
categories:
  - {id: W1, name: Weapons, blocked: ["guns"]}
  - {id: W2, name: Knives, blocked: ["knives"], threshold: 0.9}
"""
OTHER_POLICY = """name: other-set
version: 1
categories:
  - {id: D1, name: Drugs, blocked: ["drug use"]}
"""
DEFAULT, HALF = JudgeRequest(), JudgeRequest(keep_ratio=0.5)


@pytest.fixture(scope="module")
def engine(tiny_model) -> GuardEngine:
    # NOTE: short policy sets keep the prompts (and so the tests) short.
    return GuardEngine.from_pretrained(tiny_model("qwen2_5_vl"), policies=load_policy_text(POLICY))


@pytest.fixture(scope="module")
def clips() -> list[Video]:
    """Six decoded videos of different lengths (so every verdict's duration tells them apart)."""
    sampling = SamplingConfig(num_frames=2)  # the least Qwen2.5-VL takes
    return [load_video(videos.encode_video("mp4_h264", num_frames=10 + 5 * i, fps=10), sampling)
            for i in range(6)]


@pytest.fixture
def calls(monkeypatch) -> list[tuple[GuardEngine, list[Video], bool]]:
    """Every `GuardEngine.check_batch` call from now on: (engine, videos, raised)."""
    seen: list[tuple[GuardEngine, list[Video], bool]] = []
    real = GuardEngine.check_batch

    def spy(self: GuardEngine, batch, progress=None):
        batch = list(batch)
        try:
            out = real(self, batch, progress)
        except BaseException:
            seen.append((self, batch, True))
            raise
        seen.append((self, batch, False))
        return out

    monkeypatch.setattr(GuardEngine, "check_batch", spy)
    return seen


def rgba(video: Video) -> Video:
    """`video` with 4-channel frames: the processor cannot read them (ValueError)."""
    clip = video.clips[0]
    frames = np.concatenate([clip.frames, np.full(clip.frames.shape[:3] + (1,), 255, np.uint8)],
                            axis=-1)
    return dataclasses.replace(video, clips=(dataclasses.replace(clip, frames=frames),))


def assert_same_verdict(got: Verdict, want: Verdict) -> None:
    """Equal but for timings; scores to float noise (a batch pads, a single check does not)."""
    g, w = got.model_dump(exclude={"timing_ms"}), want.model_dump(exclude={"timing_ms"})
    g_scores, w_scores = _pop_scores(g), _pop_scores(w)
    assert g == w
    assert g_scores == pytest.approx(w_scores, abs=1e-5)


def _pop_scores(dump: dict) -> list[float]:
    scores = [c.pop("score") for c in dump["categories"]]
    for seg in dump["segments"]:
        scores += list(seg["scores"].values())
        seg["scores"] = sorted(seg["scores"])
    return scores


def test_equal_settings_share_one_batch_and_outputs_keep_input_order(engine, clips, calls):
    other_a, other_b = load_policy_text(OTHER_POLICY), load_policy_text(OTHER_POLICY)  # equal
    requests = [DEFAULT, HALF, JudgeRequest(), JudgeRequest(policies=other_a),
                JudgeRequest(keep_ratio=0.5), JudgeRequest(policies=other_b)]
    references = {DEFAULT.key(): engine, HALF.key(): engine.with_config(keep_ratio=0.5),
                  JudgeRequest(policies=other_a).key(): engine.with_policies(other_a)}
    want = [references[r.key()].check(v) for r, v in zip(requests, clips, strict=True)]
    calls.clear()

    out = EnginePool(engine).run_batch([Work(v, r) for v, r in zip(clips, requests, strict=True)])

    assert len(out) == len(clips)
    for got, ref in zip(out, want, strict=True):
        assert isinstance(got, Verdict), got
        assert_same_verdict(got, ref)
    index = {id(v): i for i, v in enumerate(clips)}
    groups = {tuple(index[id(v)] for v in batch): (e.policies.name, e.config.keep_ratio)
              for e, batch, _ in calls}
    assert len(calls) == 3 and not any(raised for *_, raised in calls), calls
    assert groups == {(0, 2): ("tiny-set", 1.0), (1, 4): ("tiny-set", 0.5),
                      (3, 5): ("other-set", 1.0)}


def test_a_failed_batch_is_judged_one_by_one(engine, clips, calls):
    bad = rgba(clips[1])
    with pytest.raises(ValueError):
        engine.check(bad)  # the input itself is what fails
    want = [engine.check(clips[0]), engine.check(clips[2])]
    calls.clear()

    out = EnginePool(engine).run_batch([Work(v, DEFAULT) for v in (clips[0], bad, clips[2])])

    assert isinstance(out[1], InternalError) and "ValueError" in str(out[1])
    assert_same_verdict(out[0], want[0])
    assert_same_verdict(out[2], want[1])
    sizes = [(len(batch), raised) for _, batch, raised in calls]
    assert sizes == [(3, True), (1, False), (1, True), (1, False)], sizes


def test_bad_settings_fail_every_video_of_their_group_only(engine, clips, calls):
    want = engine.check(clips[1])
    calls.clear()
    bogus = JudgeRequest(mode="bogus")

    out = EnginePool(engine).run_batch([Work(clips[0], bogus), Work(clips[1], DEFAULT),
                                        Work(clips[2], JudgeRequest(mode="bogus"))])

    assert isinstance(out[0], UsageError) and isinstance(out[2], UsageError)
    assert "unknown mode 'bogus'" in str(out[0])
    assert_same_verdict(out[1], want)
    assert [[v is clips[1] for v in batch] for _, batch, _ in calls] == [[True]]  # bogus: no run
