"""Cancellation: when a request times out or its client goes away, its model work is dropped
at the next batch boundary, so the next request does not wait behind abandoned work."""

from __future__ import annotations

import time

import httpx
import pytest
import serve_fixtures
from fastapi.testclient import TestClient

from guardrail.serve.app import build_app
from guardrail.serve.judge import Cancelled, LocalJudge
from guardrail.serve.settings import Jobs, Load, ServiceSettings

engine = serve_fixtures.engine
WINDOWS = 40            # one window per second of the 40 s clip, one window per forward pass


def settings(tmp, **load) -> ServiceSettings:
    return ServiceSettings(host="127.0.0.1", frames=2, sampling=serve_fixtures.UNIFORM,
                           window_s=1.0, load=Load(**load),
                           jobs=Jobs(db_path=str(tmp / "jobs.sqlite"), workers=0))


@pytest.fixture
def spied(engine):
    """A LocalJudge over the engine judging one window per forward pass, and a record of
    every forward pass and of what each engine call returned."""
    judge = LocalJudge(engine.with_config(batch_size=1))
    passes, outcomes = [], []
    original_run, original_group = judge.pool.run_batch, judge.pool._run_group

    def run_batch(items, stop=None):
        out = original_run(items, stop)
        outcomes.extend(out)
        return out

    def run_group(req, videos, stop=None):
        engine_ = judge.pool.variant(req)
        real = engine_.check_batch

        def counted(vs, progress=None):
            def tick(*args):
                passes.append(time.monotonic())
                if progress:
                    progress(*args)
            return real(vs, progress=tick)
        engine_.check_batch = counted
        try:
            return original_group(req, videos, stop)
        finally:
            del engine_.check_batch
    judge.pool.run_batch, judge.pool._run_group = run_batch, run_group
    return judge, passes, outcomes


def test_a_timed_out_request_stops_its_work(spied, tmp_path, long_video):
    judge, passes, outcomes = spied
    app, _ = build_app(judge, settings(tmp_path, request_timeout_s=1.0))
    with TestClient(app) as c:
        files = {"file": ("v.mp4", long_video.read_bytes(), "video/mp4")}
        reply = c.post("/v1/moderate", files=files)
        assert reply.status_code == 504, reply.text
        serve_fixtures.wait_for(lambda: outcomes, 30, "the engine call did not end")
    assert isinstance(outcomes[0], Cancelled)
    assert 0 < len(passes) < WINDOWS        # stopped part way


def test_a_client_that_leaves_stops_its_work(spied, tmp_path, long_video):
    judge, passes, outcomes = spied
    app, moderator = build_app(judge, settings(tmp_path))
    with serve_fixtures.live_server(app) as url:
        files = {"file": ("v.mp4", long_video.read_bytes(), "video/mp4")}
        with pytest.raises(httpx.ReadTimeout):           # the client gives up and hangs up
            httpx.post(f"{url}/v1/moderate", files=files, timeout=httpx.Timeout(60, read=1.5))
        serve_fixtures.wait_for(lambda: outcomes, 30, "the engine call did not end")
        assert isinstance(outcomes[0], Cancelled)
        assert 0 < len(passes) < WINDOWS
        serve_fixtures.wait_for(lambda: moderator.inflight == 0, 10, "slot not freed")
