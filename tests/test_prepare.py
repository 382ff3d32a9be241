"""Host work ahead of the model across calls: `GuardEngine.prepare` does a group's decoding,
processor, rope index and layouts with no model work; `check_batch` on the result gives the
verdicts `check_batch` on the videos gives; the service prepares a waiting request while the
engine runs another one."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from guardrail.engine import GuardEngine, Prepared
from guardrail.serve.judge import JudgeRequest, LocalJudge
from guardrail.video import load_video


@pytest.fixture(scope="module", params=["qwen2_5_vl", "internvl"])
def engine(request, tiny_model) -> GuardEngine:
    return GuardEngine.from_pretrained(tiny_model(request.param))


@pytest.fixture(scope="module")
def videos(video_files):
    return [load_video(video_files[f]) for f in ("mp4_h264", "gif", "avi_mjpeg")]


def _same(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        assert [c.score for c in x.categories] == pytest.approx(
            [c.score for c in y.categories], abs=1e-6)
        assert (x.description, x.explanation) == (y.description, y.explanation)


@pytest.mark.parametrize("config", [{"batch_size": 2}, {"mode": "explain", "max_new_tokens": 8,
                                                         "layout": "sequential"}])
def test_prepared_videos_get_the_verdicts_of_the_videos(engine, videos, config):
    eng = engine.with_config(**config)
    _same(eng.check_batch(eng.prepare(videos)), eng.check_batch(videos))


def test_preparing_does_no_model_work(engine, video_files, monkeypatch):
    adapter, calls = engine.adapter, []
    for name in ("forward", "visual_features_many"):
        monkeypatch.setattr(type(adapter), name, lambda *a, _n=name, **k: calls.append(_n))
    prepared = engine.prepare([video_files["mp4_h264"]])            # a path: decoded too
    assert calls == []
    assert len(prepared.videos) == 1 and len(prepared.windows) == len(prepared.videos[0].clips)


def test_groups_prepared_apart_judge_as_one(engine, videos):
    merged = Prepared.merge([engine.prepare(videos[:1]), engine.prepare(videos[1:])])
    _same(engine.check_batch(merged), engine.check_batch(videos))


def test_pixels_are_handed_over_in_the_models_dtype(tiny_model, videos):
    eng = GuardEngine.from_pretrained(tiny_model("qwen2_5_vl"), dtype="bf16")
    prepared = eng.prepare(videos[:1])
    floats = [t for inputs, _, _ in prepared.windows for t in inputs.encoder_inputs.values()
              if t.is_floating_point()]
    assert floats and all(t.dtype == torch.bfloat16 for t in floats)
    # the encoder casts to its dtype first thing: the same values either way
    _same(eng.check_batch(prepared), eng.check_batch(videos[:1]))


def test_a_waiting_request_is_prepared_while_the_engine_runs_another(engine, videos,
                                                                       monkeypatch):
    """Request A holds the engine (its forward waits); request B, queued behind it, goes
    through the processor meanwhile, outside the engine's lock."""
    judge = LocalJudge(engine)
    adapter = engine.adapter
    a_running, b_prepared = threading.Event(), threading.Event()
    real_forward, real_inputs = type(adapter).forward, type(adapter).video_inputs

    def forward(self, *args, **kwargs):
        if not a_running.is_set():
            a_running.set()
            assert b_prepared.wait(30), "B was not prepared while A held the engine"
        return real_forward(self, *args, **kwargs)

    def video_inputs(self, clip):
        out = real_inputs(self, clip)
        if a_running.is_set() and judge.pool._lock.locked():
            b_prepared.set()
        return out

    monkeypatch.setattr(type(adapter), "forward", forward)
    monkeypatch.setattr(type(adapter), "video_inputs", video_inputs)

    async def both():
        first = asyncio.create_task(judge.check(videos[0], JudgeRequest()))
        while not a_running.is_set():
            await asyncio.sleep(0.01)
        second = asyncio.create_task(judge.check(videos[1], JudgeRequest()))
        return await asyncio.gather(first, second)

    got = asyncio.run(both())
    assert b_prepared.is_set()
    monkeypatch.undo()
    _same(got, engine.check_batch(videos[:2]))
