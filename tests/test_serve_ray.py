"""The service on a real local Ray (SPEC §6.3): the deployment path end to end.

One Ray per module (127.0.0.1, 2 CPUs), the real engine with a tiny model, the app started the
way `guardrail serve` starts it, and restarted once. Bounded: every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import time
from pathlib import Path

import httpx
import openai
import pytest
import videos
import yaml

from guardrail.serve.command import serve

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key"
AUTH = {"authorization": f"Bearer {KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(tmp: Path, port: int) -> Path:
    """deploy/serve.yaml with small queues, so a burst overflows them."""
    cfg = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    cfg["http_options"]["port"] = port
    app = cfg["applications"][0]
    app["args"]["frames"] = 2
    app["args"]["batching"] = {"max_batch_size": 4, "batch_wait_timeout_s": 0.1}
    app["args"]["jobs"] = {"db_path": str(tmp / "jobs.sqlite"), "poll_s": 0.1}
    for d in app["deployments"]:
        d.update(graceful_shutdown_wait_loop_s=0.2, graceful_shutdown_timeout_s=5)
        if d["name"] == "GuardModel":
            d.update(max_ongoing_requests=4, max_queued_requests=2)
    path = tmp / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    from ray import serve as ray_serve

    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    yield
    ray_serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def setup(ray_cluster, tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("ray")
    model = str(tiny_model("qwen2_5_vl"))
    config = write_config(tmp, free_port())
    return {"model": model, "config": config}


@pytest.fixture(scope="module")
def server(setup):
    srv = serve(setup["model"], setup["config"], api_keys=[KEY], block=False,
                ready_timeout_s=180)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def clip(video_files) -> bytes:
    return video_files["mp4_h264"].read_bytes()


def post_video(url: str, data: bytes, headers=AUTH, **fields) -> httpx.Response:
    return httpx.post(f"{url}/v1/moderate", files={"file": ("v.mp4", data, "video/mp4")},
                      data=fields, headers=headers, timeout=120)


def test_moderate_upload_with_api_key(server, clip):
    assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
    denied = post_video(server.url, clip, headers={})
    assert denied.status_code == 401 and denied.json()["error"]["type"] == "unauthorized"
    reply = post_video(server.url, clip, frames=4)
    assert reply.status_code == 200, reply.text
    verdict = reply.json()
    assert verdict["video"]["frames_used"] == 4 and len(verdict["categories"]) == 6


def test_openai_client(server, clip):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    mp4 = base64.b64encode(clip).decode()
    png = base64.b64encode(videos.encode_png()).decode()
    result = client.moderations.create(model="guardrail", input=[
        {"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{mp4}"}},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}])
    assert result.id.startswith("modr-") and len(result.results) == 2
    scores = result.results[0].category_scores.model_dump()
    assert 0.0 <= scores["Sexual Content"] <= 1.0
    assert isinstance(result.results[1].flagged, bool)
    with pytest.raises(openai.BadRequestError):
        client.moderations.create(model="guardrail", input="text is not judged")


@pytest.mark.parametrize("data", [b"", b"not a video at all", b"\x00\x00\x00\x18ftypmp42" * 3])
def test_bad_uploads_are_4xx_json(server, data):
    reply = post_video(server.url, data)
    assert 400 <= reply.status_code < 500 and set(reply.json()["error"]) == {"type", "message"}
    malformed = httpx.post(f"{server.url}/v1/moderate", content=b"{oops", timeout=30,
                           headers={**AUTH, "content-type": "application/json"})
    assert malformed.status_code == 400 and malformed.json()["error"]["type"] == "invalid_json"
    assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200


def test_overload_gives_429_and_requests_are_batched(server, clip):
    async def burst(n: int) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120, headers=AUTH) as c:
            return await asyncio.gather(*(c.post(
                f"{server.url}/v1/moderate", files={"file": ("v.mp4", clip, "video/mp4")},
                data={"frames": "8"}) for _ in range(n)))

    replies = asyncio.run(burst(24))
    statuses = [r.status_code for r in replies]
    assert set(statuses) <= {200, 429}, statuses
    assert 200 in statuses and 429 in statuses, statuses
    for r in replies:
        if r.status_code == 429:
            assert r.headers["retry-after"] and r.json()["error"]["type"] == "overloaded"
    from ray import serve as ray_serve

    stats = ray_serve.get_deployment_handle("GuardModel", "guardrail").stats.remote().result()
    assert stats["max_batch"] >= 2, stats
    assert post_video(server.url, clip).status_code == 200  # still serving
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert 'route="/v1/moderate",status="429"' in metrics


def test_job_survives_restart(setup, server, clip):
    job = httpx.post(f"{server.url}/v1/jobs", files={"file": ("v.mp4", clip, "video/mp4")},
                     headers=AUTH, timeout=60).json()
    done = wait_job(server.url, job["id"], AUTH)
    assert done["status"] == "succeeded"
    pending = httpx.post(f"{server.url}/v1/jobs", files={"file": ("v.mp4", clip, "video/mp4")},
                         headers=AUTH, timeout=60).json()["id"]
    server.stop()
    again = serve(setup["model"], setup["config"], block=False, ready_timeout_s=180)  # no keys
    try:
        assert httpx.get(f"{again.url}/v1/jobs/{done['id']}", timeout=10).json() == done
        assert wait_job(again.url, pending, {})["status"] == "succeeded"
    finally:
        again.stop()


def wait_job(url: str, job_id: str, headers: dict, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", headers=headers, timeout=10).json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.2)
    pytest.fail(f"job {job_id} did not end in {timeout_s} s")
