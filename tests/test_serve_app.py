"""The HTTP API (SPEC §6.1, §6.2) in-process: a real tiny engine behind `create_app`, no Ray."""

from __future__ import annotations

import asyncio
import base64
import functools
import re
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import serve_fixtures
import videos
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from guardrail.engine import GuardEngine
from guardrail.errors import UsageError
from guardrail.serve.app import create_app
from guardrail.serve.errors import Unavailable
from guardrail.serve.judge import LocalJudge
from guardrail.serve.settings import Jobs, Limits, Load, ServiceSettings

ROOT = Path(__file__).resolve().parents[1]
VERDICT_KEYS = {"flagged", "categories", "description", "explanation", "segments", "model",
                "policy_set", "layout", "mode", "video", "pruning", "timing_ms",
                "policy_version", "policy_hash", "calibrated", "warnings"}
POLICY = """name: tiny-set
version: 1
categories:
  - {id: W1, name: Weapons, blocked: ["guns"]}
  - {id: W2, name: Knives, blocked: ["knives"], threshold: 0.9}
"""


engine, clip = serve_fixtures.engine, serve_fixtures.clip   # shared fixtures
UNIFORM = serve_fixtures.UNIFORM


def settings(tmp: Path, **changes) -> ServiceSettings:
    base = {"host": "127.0.0.1", "frames": 2,  # 2 frames: the least Qwen2.5-VL takes
            "sampling": UNIFORM,
            "jobs": Jobs(db_path=str(tmp / "jobs.sqlite"), workers=0)}
    return ServiceSettings(**{**base, **changes})


@pytest.fixture(scope="module")
def client(engine, tmp_path_factory):
    app = create_app(LocalJudge(engine), settings(tmp_path_factory.mktemp("app")))
    with TestClient(app) as c:
        yield c


def upload(client, data: bytes, name: str = "v.mp4", ctype: str = "video/mp4", **fields):
    return client.post("/v1/moderate", files={"file": (name, data, ctype)},
                       data={k: str(v) for k, v in fields.items()})


def assert_error(reply, status: int, kind: str | None = None) -> dict:
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
    assert kind is None or body["error"]["type"] == kind, body
    return body["error"]


def test_moderate_upload_returns_verdict(client, clip):
    reply = upload(client, clip, frames=4)
    assert reply.status_code == 200, reply.text
    verdict = reply.json()
    assert set(verdict) == VERDICT_KEYS
    assert [c["id"] for c in verdict["categories"]] == [f"C{i}" for i in range(1, 7)]
    assert verdict["video"]["frames_used"] == 4 and verdict["policy_set"] == "safewatch"
    assert upload(client, clip).json()["video"]["frames_used"] == 2  # the service's default
    assert verdict["timing_ms"]["decode_video"] > 0
    assert verdict["timing_ms"]["total"] >= verdict["timing_ms"]["prefill"]


def test_json_base64_equals_upload(client, clip):
    by_json = client.post("/v1/moderate", json={"video_base64": base64.b64encode(clip).decode()})
    by_form = upload(client, clip)
    assert by_json.status_code == by_form.status_code == 200
    scores = [[c["score"] for c in r.json()["categories"]] for r in (by_json, by_form)]
    assert scores[0] == scores[1]


def test_policy_text_and_registered_set(client, clip):
    custom = upload(client, clip, policy=POLICY, mode="fast")
    assert custom.status_code == 200, custom.text
    assert [c["id"] for c in custom.json()["categories"]] == ["W1", "W2"]
    assert custom.json()["categories"][1]["threshold"] == 0.9
    weapons = client.post("/v1/moderate", json={
        "video_base64": base64.b64encode(clip).decode(), "policy_set": "weapons"})
    assert weapons.status_code == 200 and weapons.json()["policy_set"] == "weapons"


def test_mode_and_keep_ratio_per_request(engine, tmp_path, clip):
    with TestClient(create_app(LocalJudge(engine), settings(tmp_path, max_new_tokens=8))) as c:
        explained = upload(c, clip, mode="explain", frames=2)
        pruned = upload(c, clip, keep_ratio=0.5, frames=2)
    assert explained.status_code == 200, explained.text
    assert explained.json()["mode"] == "explain"
    assert explained.json()["description"] is not None
    assert pruned.status_code == 200, pruned.text
    p = pruned.json()["pruning"]
    assert p["keep_ratio"] == 0.5 and p["kept_tokens"] < p["total_tokens"]


def test_policies_lists_the_directory(client):
    listing = client.get("/v1/policies").json()
    names = {p["name"] for p in listing["policy_sets"]}
    assert names == {p.stem for p in (ROOT / "policies").glob("*.yaml")}
    assert listing["default"] == "safewatch"
    safewatch = next(p for p in listing["policy_sets"] if p["name"] == "safewatch")
    assert safewatch["default"] and len(safewatch["categories"]) == 6


@pytest.mark.parametrize("name,data,ctype,status", [
    ("empty", b"", "video/mp4", 415),
    ("text", b"hello, not a video\n" * 10, "video/mp4", 415),
    ("truncated", None, "video/mp4", None),
    ("audio_only", videos.encode_audio_only(), "audio/wav", None),
    ("zero_frames", videos.encode_zero_frame_video(), "video/x-matroska", None),
    ("png_as_image", videos.encode_png(), "image/png", 200),
])
def test_bad_uploads_are_4xx_and_service_keeps_serving(client, clip, name, data, ctype, status):
    if name == "truncated":
        data = clip[: len(clip) // 3]
    reply = upload(client, data, ctype=ctype)
    if status == 200:  # an image part is judged as a one-frame video
        assert reply.status_code == 200 and reply.json()["video"]["frames_used"] == 1
    elif status is None and reply.status_code == 200:
        pytest.fail(f"{name}: accepted a broken video")
    else:
        err = assert_error(reply, status or reply.status_code)
        assert 400 <= reply.status_code < 500 and "\n" not in err["message"]
    assert client.get("/healthz").status_code == 200
    assert upload(client, clip).status_code == 200


@pytest.mark.parametrize("body,status,kind", [
    (b"{not json", 400, "invalid_json"),
    (b'{"video_base64": "AAAA", "surprise": 1}', 422, "invalid_request"),
    (b'{"video_base64": "AAAA", "mode": "slow"}', 422, "invalid_request"),
    (b'{"video_base64": "AAAA", "keep_ratio": 2}', 422, "invalid_request"),
    (b'{"video_base64": "AAAA", "frames": 0}', 422, "invalid_request"),
    (b'{"video_base64": "AAAA", "frames": 100000}', 400, "invalid_request"),
    (b'{"policy_set": "safewatch"}', 400, "invalid_request"),
    (b'{"video_base64": "%%%"}', 400, "invalid_request"),
    (b'{"video_base64": "AAAA", "policy_set": "nope"}', 400, "invalid_request"),
    (b'{"video_base64": "AAAA", "policy": "name: x\\n"}', 422, "invalid_policy"),
    (b'{"video_base64": "AAAA", "policy": "a", "policy_set": "weapons"}', 400, None),
    (b"[1, 2]", 422, "invalid_request"),
])
def test_malformed_json_requests(client, body, status, kind):
    reply = client.post("/v1/moderate", content=body, headers={"content-type": "application/json"})
    assert_error(reply, status, kind)


def test_wrong_content_type_route_and_method(client):
    assert_error(client.post("/v1/moderate", content=b"x", headers={"content-type": "text/plain"}),
                 415, "unsupported_media")
    assert_error(client.get("/v1/nothing"), 404, "not_found")
    assert_error(client.get("/v1/moderate"), 405, "method_not_allowed")
    assert_error(client.post("/v1/moderations", content=b"{", headers={
        "content-type": "application/json"}), 400, "invalid_json")
    assert_error(client.post("/v1/moderations", content=b'{"input": []}', headers={
        "content-type": "text/plain"}), 415, "unsupported_media")


_SCALARS = (st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False)
            | st.text(max_size=8))
_JSON = st.recursive(_SCALARS,
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.sampled_from(
                         ["video_base64", "video_url", "policy", "policy_set", "mode", "frames",
                          "keep_ratio", "input", "model", "webhook_url", "x"]), inner, max_size=4),
                     max_leaves=8)


@hyp_settings(max_examples=40, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_JSON, route=st.sampled_from(["/v1/moderate", "/v1/moderations", "/v1/jobs"]))
def test_fuzzed_json_is_never_a_500(client, body, route):
    reply = client.post(route, json=body)
    assert reply.status_code < 500 or reply.status_code == 504, reply.text
    if reply.status_code >= 400:
        assert set(reply.json()["error"]) == {"type", "message"}


@hyp_settings(max_examples=25, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=4096))
@example(data=b"\t" + bytes(23))            # FFmpeg reads it as CD+G karaoke graphics
def test_fuzzed_uploads_are_never_a_500(client, clip, data):
    reply = upload(client, data)
    assert 400 <= reply.status_code < 500, reply.text


def test_openai_shape(client, clip, video_files):
    png = base64.b64encode(videos.encode_png()).decode()
    mp4 = base64.b64encode(clip).decode()
    reply = client.post("/v1/moderations", json={"model": "guardrail", "input": [
        {"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{mp4}"}},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}]})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["id"].startswith("modr-") and len(body["results"]) == 2
    video, image = body["results"]
    assert set(video) == {"flagged", "categories", "category_scores",
                          "category_applied_input_types"}
    assert set(video["categories"]) == set(video["category_scores"])
    assert len(video["categories"]) == 6
    assert video["category_applied_input_types"]["Sexual Content"] == ["video"]
    assert image["category_applied_input_types"]["Sexual Content"] == ["image"]
    for bad in ("some text", [{"type": "text", "text": "hi"}], []):
        assert_error(client.post("/v1/moderations", json={"input": bad}), 400)
    text = {"type": "video_url", "video_url": {"url": "data:text/plain;base64,aGk="}}
    assert_error(client.post("/v1/moderations", json={"input": [text]}), 415)
    junk = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,aGk="}}
    good = {"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{mp4}"}}
    assert_error(client.post("/v1/moderations", json={"input": [good, junk]}), 415)


def test_server_paths_and_urls_refused_unless_allowed(engine, tmp_path, clip):
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "v.mp4").write_bytes(clip)
    (tmp_path / "secret.mp4").write_bytes(clip)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    files = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{files.server_address[1]}"
    refs = {"file": f"file://{tmp_path}/ok/v.mp4", "escape": f"file://{tmp_path}/ok/../secret.mp4",
            "etc": "/etc/passwd", "url": f"{origin}/ok/v.mp4", "missing": f"{origin}/ok/no.mp4",
            "outside": f"{origin}/secret.mp4", "port": "http://127.0.0.1:9/ok/v.mp4",
            "lookalike": f"{origin}.evil.test/ok/v.mp4", "ftp": "ftp://example.com/v.mp4"}
    s = settings(tmp_path, allow_paths=[str(tmp_path / "ok")], allow_urls=[f"{origin}/ok"])
    try:
        with TestClient(create_app(LocalJudge(engine), s)) as c:
            got = {k: c.post("/v1/moderate", json={"video_url": v}).status_code
                   for k, v in refs.items()}
    finally:
        files.shutdown()
    assert got == {"file": 200, "escape": 403, "etc": 403, "url": 200, "missing": 422,
                   "outside": 403, "port": 403, "lookalike": 400, "ftp": 400}


def test_limits_upload_duration_pixels(engine, tmp_path, clip, long_video):
    s = settings(tmp_path, limits=Limits(max_upload_bytes=len(clip) + 10, max_duration_s=10,
                                         max_pixels=64 * 48))
    with TestClient(create_app(LocalJudge(engine), s)) as c:
        assert upload(c, clip).status_code == 200
        assert_error(upload(c, clip + bytes(8 << 20)), 413, "payload_too_large")
        streamed = iter([b'{"video_base64": "'] + [b"A" * (1 << 20)] * 8 + [b'"}'])
        assert_error(c.post("/v1/moderate", content=streamed,
                            headers={"content-type": "application/json"}), 413,
                     "payload_too_large")
        assert_error(upload(c, clip + bytes(100)), 413, "video_too_large")
        big = base64.b64encode(clip + bytes(100)).decode()
        assert_error(c.post("/v1/moderate", json={"video_base64": big}), 413)
        assert_error(upload(c, long_video.read_bytes()), 413, "video_too_large")
        wide = videos.encode_video(num_frames=3, width=128, height=48)
        assert_error(upload(c, wide), 413, "video_too_large")
        assert c.get("/healthz").status_code == 200


def test_request_timeout_is_504(engine, tmp_path, clip):
    s = settings(tmp_path, load=Load(request_timeout_s=0.001))
    with TestClient(create_app(LocalJudge(engine), s)) as c:
        assert_error(upload(c, clip), 504, "timeout")
        assert c.get("/healthz").status_code == 200


def test_api_keys(engine, tmp_path, clip, monkeypatch):
    with TestClient(create_app(LocalJudge(engine), settings(tmp_path, api_keys=["k1"]))) as c:
        err = c.get("/v1/policies")
        assert_error(err, 401, "unauthorized")
        assert err.headers["www-authenticate"] == "Bearer"
        assert_error(c.get("/v1/policies", headers={"authorization": "Bearer nope"}), 401)
        assert c.get("/v1/policies", headers={"authorization": "Bearer k1"}).status_code == 200
        assert c.get("/healthz").status_code == 200
    monkeypatch.delenv("GUARDRAIL_API_KEYS", raising=False)
    with pytest.raises(UsageError, match="needs API keys"):
        create_app(LocalJudge(engine), settings(tmp_path, host="0.0.0.0"))
    with pytest.raises(UsageError, match="needs API keys"):
        create_app(LocalJudge(engine), settings(tmp_path, host=None))
    monkeypatch.setenv("GUARDRAIL_API_KEYS", "k2, k3")
    with TestClient(create_app(LocalJudge(engine), settings(tmp_path, host="0.0.0.0"))) as c:
        assert c.get("/v1/policies", headers={"authorization": "Bearer k3"}).status_code == 200
        assert c.get("/v1/policies").status_code == 401


def test_overload_gives_429_not_a_queue(engine, tmp_path, clip):
    s = settings(tmp_path, load=Load(max_inflight=3, retry_after_s=2))
    app = create_app(LocalJudge(engine, max_queued=0, retry_after_s=2), s)

    async def burst():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await asyncio.gather(*(c.post("/v1/moderate", files={
                "file": ("v.mp4", clip, "video/mp4")}) for _ in range(8)))

    replies = asyncio.run(burst())
    statuses = sorted(r.status_code for r in replies)
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 1 and 429 in statuses
    for r in replies:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "2" and r.json()["error"]["type"] == "overloaded"


class DownJudge:
    """A judge whose model is not up: what a crashed or still-loading replica looks like."""

    async def check(self, video, request):
        raise Unavailable("model replica unavailable", 7)

    async def info(self):
        raise ConnectionError("no replica")

    def depth(self) -> int:
        return 0


def test_unavailable_model_is_503_with_retry_after(tmp_path, clip):
    with TestClient(create_app(DownJudge(), settings(tmp_path))) as c:
        health = c.get("/healthz")
        assert_error(health, 503, "unavailable")
        assert health.headers["retry-after"] == "5"
        reply = upload(c, clip)
        assert_error(reply, 503, "unavailable")
        assert reply.headers["retry-after"] == "7"
        assert_error(upload(c, b"junk"), 415)  # bad input is still the client's fault


def test_metrics(client, clip):
    assert upload(client, clip).status_code == 200
    text = client.get("/metrics").text
    for needle in ('guardrail_requests_total{method="POST",route="/v1/moderate",status="200"}',
                   'guardrail_stage_seconds_bucket{le="+Inf",stage="prefill"}',
                   'guardrail_videos_judged_total{', 'guardrail_queue_depth{queue="engine"}',
                   'guardrail_request_seconds_count{route="/v1/moderate"}', 'guardrail_jobs{'):
        assert needle in text, needle


def _long_policy(categories: int = 40) -> str:
    rule = "Footage that shows or describes a very specific situation in great detail. " * 6
    rows = "".join(f"  - {{id: L{i}, name: Long {i}, blocked: [{rule!r}]}}\n"
                   for i in range(categories))
    return f"name: long\nversion: 1\ncategories:\n{rows}"


def test_a_policy_too_long_for_the_context_is_refused_before_any_tensor(small_context_model,
                                                                       tmp_path, clip,
                                                                       monkeypatch):
    from guardrail.cli import app as cli
    from guardrail.layout import plan

    model = small_context_model(4096)
    engine = GuardEngine.from_pretrained(model)                  # the default set fits
    planned = []
    monkeypatch.setattr("guardrail.engine.plan", lambda *a, **k: planned.append(1) or plan(*a, **k))
    with TestClient(create_app(LocalJudge(engine), settings(tmp_path))) as c:
        reply = c.post("/v1/moderate", files={"file": ("v.mp4", clip, "video/mp4")},
                       data={"policy": _long_policy()})
        body = assert_error(reply, 413, "prompt_too_long")
        assert re.search(r"needs [\d,]+ tokens .*context is 4,096 tokens", body["message"])
        assert not planned                                       # no layout, no tensor
        assert upload(c, clip).status_code == 200                # and the service goes on
    policy = tmp_path / "long.yaml"
    policy.write_text(_long_policy())
    (tmp_path / "v.mp4").write_bytes(clip)
    got = CliRunner().invoke(cli, ["check", str(tmp_path / "v.mp4"), "--model", str(model),
                                   "--policy", str(policy)])
    assert got.exit_code == 2 and "context is 4,096 tokens" in got.stderr, got.output


def test_a_full_server_refuses_before_reading_the_body(engine, tmp_path, clip):
    """With every in-flight slot taken (here by a slow upload), the next request is answered
    429 without one byte of its body read, however large it says it is."""
    app = create_app(LocalJudge(engine), settings(tmp_path, load=Load(max_inflight=1)))
    body = b'{"video_base64": "' + base64.b64encode(clip) + b'"}'

    def scope():
        return {"type": "http", "method": "POST", "path": "/v1/moderate", "raw_path": b"",
                "query_string": b"", "root_path": "", "scheme": "http", "http_version": "1.1",
                "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1),
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]}

    async def run():
        release, reads, sent = asyncio.Event(), {"slow": 0, "next": 0}, {}

        def receiver(name, first_only):
            async def receive():
                reads[name] += 1
                if reads[name] == 1:
                    return {"type": "http.request", "body": body[:10], "more_body": True}
                if first_only:
                    await release.wait()
                return {"type": "http.request", "body": body[10:], "more_body": False}
            return receive

        def sender(name):
            async def send(message):
                if message["type"] == "http.response.start":
                    sent[name] = message["status"]
            return send

        slow = asyncio.create_task(app(scope(), receiver("slow", True), sender("slow")))
        while reads["slow"] == 0:                       # the slow upload holds the slot
            await asyncio.sleep(0.01)
        await app(scope(), receiver("next", False), sender("next"))
        assert sent["next"] == 429 and reads["next"] == 0
        release.set()
        await slow
        return sent["slow"]

    assert asyncio.run(run()) == 200                   # the slow one still succeeded


def test_the_service_samples_by_coverage_over_playback_by_default(engine, tmp_path):
    """Without settings, uploads are sampled by coverage over their playback: the variable
    frame rate tricks are judged with their true duration, and a budget that cannot cover a
    long video says so in the verdict's warnings."""
    settings = ServiceSettings(host="127.0.0.1", frames=2,
                               jobs=Jobs(db_path=str(tmp_path / "jobs.sqlite"), workers=0))
    assert settings.sampling.mode == "coverage"
    with TestClient(create_app(LocalJudge(engine), settings)) as c:
        reply = upload(c, videos.green_then_red_for_50_minutes(), name="v.mkv",
                       ctype="video/x-matroska")
        assert reply.status_code == 200, reply.text
        video = reply.json()["video"]
        assert video["sampling"] == "coverage" and video["shots"] == 2
        assert video["duration_s"] == pytest.approx(3000.3, abs=0.05)
        assert reply.json()["segments"][-1]["end_s"] == pytest.approx(3000.3, abs=0.05)
        hours = upload(c, videos.three_frames_over_hours(), name="h.mkv",
                       ctype="video/x-matroska").json()
        assert hours["video"]["duration_s"] == pytest.approx(14040.0, abs=0.05)
        assert hours["video"]["frames_used"] == 64                 # the service's budget
        assert any("coverage cut by the frame budget" in w for w in hours["warnings"])


def test_thin_frames_are_422_not_500(client):
    """Frames whose longer side is over 200 times the shorter (the Qwen-VL processors refuse
    them, and a 1-pixel side reads as a channel axis): 422 with the size, for images and video
    alike, and the service keeps serving."""
    import io

    from PIL import Image

    for size in ((1, 4000), (4000, 1), (3000, 3)):
        buf = io.BytesIO()
        Image.new("RGB", size, (120, 30, 30)).save(buf, format="PNG")
        error = assert_error(upload(client, buf.getvalue(), "thin.png", "image/png"), 422)
        assert "too thin" in error["message"]
    wide = videos.encode_video("mp4_h264", num_frames=3, width=4096, height=16)
    assert "4096x16 is too thin" in assert_error(upload(client, wide), 422)["message"]
    assert client.get("/healthz").status_code == 200


def test_small_routes_refuse_large_bodies_before_reading_them(client):
    """Sign-in, review decisions and other small routes are capped at 4 KB (413 as soon as the
    declared or streamed size passes it); uploads keep the upload limit."""
    big = b"key=" + b"x" * 300_000
    for path in ("/review/login", "/review/logout", "/v1/reviews/rev-x"):
        reply = client.post(path, content=big, headers={
            "content-type": "application/x-www-form-urlencoded", "origin": "http://testserver",
            "sec-fetch-site": "same-origin"})
        assert_error(reply, 413)

    def chunks():
        for _ in range(100):
            yield b"x" * 1024                              # no Content-Length: streamed
    reply = client.post("/review/login", content=chunks(), headers={
        "content-type": "application/x-www-form-urlencoded", "sec-fetch-site": "same-origin"})
    assert_error(reply, 413)
    assert client.post("/review/login", content=b"key=nope", headers={
        "content-type": "application/x-www-form-urlencoded",
        "sec-fetch-site": "same-origin"}).status_code == 401
