"""Cost budgets of the service: prompt tokens (an inline policy, a registered set, a window),
decoded-frame bytes (one video: 413; the process: 429 with Retry-After), in-flight slots per
key (one key cannot take them all), and the pace of a request body (a trickled upload is 408
within seconds and frees its slot)."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import httpx
import pytest
import serve_fixtures
import videos
from fastapi.testclient import TestClient

from guardrail.serve import limits as limits_module
from guardrail.serve.app import build_app, create_app, key_id
from guardrail.serve.judge import LocalJudge, load_engine
from guardrail.serve.settings import Jobs, Limits, Load, ServiceSettings

engine, clip = serve_fixtures.engine, serve_fixtures.clip
ROOT = Path(__file__).parents[1]


def settings(tmp: Path, **changes) -> ServiceSettings:
    base = {"host": "127.0.0.1", "frames": 2, "sampling": serve_fixtures.UNIFORM,
            "jobs": Jobs(db_path=str(tmp / "jobs.sqlite"), workers=0)}
    return ServiceSettings(**{**base, **changes})


def upload(client, data: bytes, headers: dict | None = None, **fields):
    return client.post("/v1/moderate", files={"file": ("v.mp4", data, "video/mp4")},
                       data={k: str(v) for k, v in fields.items()}, headers=headers or {})


def error_of(reply, status: int, kind: str) -> str:
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["type"] == kind, reply.text
    return reply.json()["error"]["message"]


def _policy(categories: int) -> str:
    rule = "Footage that shows or describes a very specific situation in great detail. " * 3
    rows = "".join(f"  - {{id: L{i}, name: Long {i}, blocked: [{rule!r}]}}\n"
                   for i in range(categories))
    return f"name: long\nversion: 1\ncategories:\n{rows}"


def test_the_prompt_budget_refuses_long_policies_and_windows(engine, tmp_path, clip):
    """The budget sits below the model's context: an inline policy whose text reaches it is 413
    with the numbers before any tensor; so is a window whose frames take it over; a set
    within it is judged."""
    text = engine.tokens.text_tokens
    small = engine.with_config(max_prompt_tokens=text + 3)       # the default set + 3 tokens
    with TestClient(create_app(LocalJudge(small), settings(tmp_path))) as c:
        message = error_of(upload(c, clip, policy=_policy(60)), 413, "prompt_too_long")
        assert re.search(rf"needs [\d,]+ tokens .*prompt budget is {text + 3:,} tokens",
                         message), message
        message = error_of(upload(c, clip), 413, "prompt_too_long")   # 2 frames: more than 3 tokens
        assert re.search(r"a window's prompt needs [\d,]+ tokens \([\d,]+ of policies and text, "
                         r"[\d,]+ of video\)", message), message
    roomy = engine.with_config(max_prompt_tokens=text + 4096)
    with TestClient(create_app(LocalJudge(roomy), settings(tmp_path))) as c:
        assert upload(c, clip).status_code == 200


def test_the_service_passes_its_prompt_budget_to_the_engine(tiny_model):
    s = ServiceSettings(model=str(tiny_model("qwen2_5_vl")), host="127.0.0.1",
                        limits=Limits(max_prompt_tokens=5000))
    assert load_engine(s).config.max_prompt_tokens == 5000


def test_decoded_frames_over_the_per_video_budget_are_413(engine, tmp_path, clip):
    tiny = Limits(max_decoded_bytes=64 * 48 * 3 * 3)             # 3 frames of the clip
    with TestClient(create_app(LocalJudge(engine), settings(tmp_path, limits=tiny))) as c:
        assert upload(c, clip, frames=2).status_code == 200
        message = error_of(upload(c, clip, frames=4), 413, "video_too_large")
        assert "4 frames of 64x48" in message and "ask for fewer frames" in message


def test_the_process_decode_budget_is_429_not_an_oom(engine, tmp_path, clip):
    """Frames held by other requests fill the budget: the next request is 429 with
    Retry-After (and 413 when one video alone is more than the whole budget)."""
    need = 2 * 64 * 48 * 3
    s = settings(tmp_path, load=Load(decode_memory_bytes=3 * need, retry_after_s=2))
    app, moderator = build_app(LocalJudge(engine), s)
    with TestClient(app) as c:
        with moderator.memory.lease() as held:
            held.take(2 * need)                                # two videos' frames held
            reply = upload(c, clip)
            assert reply.status_code == 200, reply.text       # the third still fits
            assert moderator.memory.used == 2 * need            # and gave its bytes back
            held.take(need // 2)
            message = error_of(upload(c, clip), 429, "overloaded")
            assert "budget" in message and upload(c, clip).headers["Retry-After"] == "2"
        assert moderator.memory.used == 0
        assert upload(c, clip).status_code == 200
        message = error_of(upload(c, clip, frames=8), 413, "video_too_large")
        assert "budget" in message


def test_one_key_cannot_take_every_slot(engine, tmp_path, clip):
    keys = {"api_keys": ["key-a-secret", "key-b-secret"]}
    s = settings(tmp_path, **keys, load=Load(max_inflight=8, max_inflight_per_key=3))
    app, moderator = build_app(LocalJudge(engine), s)
    a = {"Authorization": "Bearer key-a-secret"}
    b = {"Authorization": "Bearer key-b-secret"}
    with TestClient(app) as c:
        slots = [moderator.admitted(key_id("key-a-secret")) for _ in range(3)]
        for slot in slots:
            slot.__enter__()
        try:
            message = error_of(upload(c, clip, a), 429, "overloaded")
            assert "max_inflight_per_key" in message
            assert upload(c, clip, b).status_code == 200          # another key gets in
            wrong = {"Authorization": "Bearer guess"}              # shares "anonymous"
            assert upload(c, clip, wrong).status_code == 401
        finally:
            for slot in slots:
                slot.__exit__(None, None, None)
        assert upload(c, clip, a).status_code == 200
        assert not moderator.by_caller and moderator.inflight == 0


@pytest.fixture
def live(engine, tmp_path, monkeypatch):
    """The app on a real uvicorn server on 127.0.0.1 (a trickled body needs a real socket)."""
    monkeypatch.setattr(limits_module, "GRACE_S", 0.5)
    s = settings(tmp_path, load=Load(max_inflight=2, body_timeout_s=30, min_body_rate=1000))
    app, moderator = build_app(LocalJudge(engine), s)
    with serve_fixtures.live_server(app) as url:
        yield url, moderator


def _trickle(url: str, path: str, declared: int) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)))
    conn.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {declared}\r\n\r\n{{".encode())
    return conn


def test_a_trickled_body_is_408_and_frees_its_slot(live, clip):
    url, moderator = live
    started = time.monotonic()
    conns = [_trickle(url, "/v1/moderate", 100_000) for _ in range(2)]    # every slot
    serve_fixtures.wait_for(lambda: moderator.inflight == 2, 30, "slots not taken")
    replies = []
    for conn in conns:
        conn.settimeout(30)
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        replies.append(data.decode("latin-1"))
        conn.close()
    assert time.monotonic() - started < 30     # the pace rule (0.5 s here), not the 130 s
    for reply in replies:
        assert reply.startswith("HTTP/1.1 408"), reply[:200]
        assert "request_timeout" in reply and "connection: close" in reply.lower()
    serve_fixtures.wait_for(lambda: moderator.inflight == 0, 10, "slots not freed")
    files = {"file": ("v.mp4", clip, "video/mp4")}
    assert httpx.post(f"{url}/v1/moderate", files=files, timeout=60).status_code == 200


def test_a_fast_body_is_not_cut_by_the_pace_rule(live):
    """A body that keeps up the minimum rate may take longer than the grace."""
    url, _ = live
    data = videos.encode_video("mp4_h264", num_frames=30, fps=10)

    def slowly():
        for k in range(0, len(data), 800):          # ~800 bytes per 0.2 s: 4000 B/s > 1000
            yield data[k: k + 800]
            time.sleep(0.2)

    boundary = "xyzboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"v.mp4\"\r\nContent-Type: video/mp4\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def body():
        yield head
        yield from slowly()
        yield tail

    reply = httpx.post(f"{url}/v1/moderate", content=body(), timeout=60, headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert reply.status_code == 200, reply.text
