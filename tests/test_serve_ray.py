"""The service on a real local Ray (SPEC §6.3): the deployment path end to end.

One Ray and one Serve HTTP proxy per module (127.0.0.1, 2 CPUs), the real engine with a tiny
model, the app started the way `guardrail serve` starts it. Tests that stop or break a service
run their own application (own name, route prefix and job store) beside the module's one.
Bounded: every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import os
import signal
import socket
import subprocess
import sys
import threading
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
DEPLOY = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())


def write_config(tmp: Path, http: dict, app_name: str | None = None, **args) -> Path:
    """deploy/serve.yaml on the module's proxy (`http`), with small queues so that a burst
    overflows them. `app_name`: a separate application under /<app_name>, its deployments
    taking no CPU (the module's app holds both); `args` replace top-level service settings."""
    cfg = copy.deepcopy(DEPLOY)
    cfg["http_options"] = http
    app = cfg["applications"][0]
    app["args"]["frames"] = 2
    app["args"]["sampling"] = {"mode": "uniform"}       # frame counts the tests check
    app["args"]["batching"] = {"max_batch_size": 4, "batch_wait_timeout_s": 0.1}
    app["args"]["jobs"] = {"db_path": str(tmp / "jobs.sqlite"), "poll_s": 0.1}
    app["args"].update(args)
    for d in app["deployments"]:
        d.update(graceful_shutdown_wait_loop_s=0.2, graceful_shutdown_timeout_s=5)
        if d["name"] == "GuardModel":
            d.update(max_ongoing_requests=4, max_queued_requests=2)
        if app_name:
            d["ray_actor_options"] = {"num_cpus": 0}
    if app_name:
        app.update(name=app_name, route_prefix=f"/{app_name}")
    path = tmp / f"serve-{app_name or 'module'}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start_proxy(tries: int = 5) -> dict:
    """Start Serve's HTTP proxy on a port the OS offers; when another process binds that port
    first (the proxy cannot take port 0 and tell us the port), start again on another. Returns
    the proxy's http_options, which every config of this module must repeat."""
    from ray import serve as ray_serve

    for _ in range(tries):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            http = {**DEPLOY["http_options"], "host": "127.0.0.1", "port": s.getsockname()[1]}
        try:
            ray_serve.start(http_options=http, proxy_location=DEPLOY["proxy_location"])
            return http
        except RuntimeError as err:
            if "Failed to bind" not in str(err):
                raise
            ray_serve.shutdown()
    pytest.fail(f"Serve's proxy found no free port in {tries} tries")


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    from ray import serve as ray_serve

    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    try:
        yield start_proxy()
    finally:
        ray_serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def model(tiny_model) -> str:
    return str(tiny_model("qwen2_5_vl"))


@pytest.fixture(scope="module")
def setup(ray_cluster, tmp_path_factory, model):
    return {"model": model, "config": write_config(tmp_path_factory.mktemp("ray"), ray_cluster)}


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


def test_review_console_on_ray(server, clip):
    """On Ray too, a flagged verdict reaches the review queue with its thumbnails, and the
    console signs in through Serve's proxy."""
    policy = ("name: ray-review\nversion: 1\ncategories:\n"
              "  - {id: R1, name: Always, blocked: [anything], threshold: 0.001}\n")
    verdict = post_video(server.url, clip, frames=2, policy=policy).json()
    deadline = time.monotonic() + 30
    while not (listed := httpx.get(f"{server.url}/v1/reviews", params={
            "policy_set": "ray-review"}, headers=AUTH, timeout=10).json()["items"]):
        assert time.monotonic() < deadline, "the verdict was not kept for review"
        time.sleep(0.05)                                  # kept in the background
    assert verdict["flagged"] and [i["verdict"] for i in listed] == [verdict]
    detail = httpx.get(f"{server.url}/v1/reviews/{listed[0]['id']}", headers=AUTH,
                       timeout=10).json()
    jpeg = httpx.get(f"{server.url}/v1/reviews/{listed[0]['id']}/frames/0", headers=AUTH,
                     timeout=10)
    assert len(detail["frames"]) == 2 and jpeg.headers["content-type"] == "image/jpeg"
    with httpx.Client(base_url=server.url, timeout=10, follow_redirects=True) as browser:
        assert browser.get("/review").status_code == 401
        signed_in = browser.post("/review/login", data={"key": KEY},   # follows the redirect
                                 headers={"Sec-Fetch-Site": "same-origin"})
        assert signed_in.status_code == 200 and 'id="queue"' in signed_in.text


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


def test_queued_job_runs_after_a_restart(ray_cluster, model, tmp_path, clip):
    # The first service only accepts jobs (no runner), so the job is surely still queued when
    # it stops; the second, on the same job store, runs it.
    accept_only = write_config(tmp_path, ray_cluster, "restart",
                               jobs={"db_path": str(tmp_path / "jobs.sqlite"), "workers": 0})
    first = serve(model, accept_only, api_keys=[KEY], block=False, ready_timeout_s=180)
    try:
        reply = httpx.post(f"{first.url}/v1/jobs", files={"file": ("v.mp4", clip, "video/mp4")},
                           headers=AUTH, timeout=60)
        assert reply.status_code == 202, reply.text
        queued = httpx.get(f"{first.url}/v1/jobs/{reply.json()['id']}", headers=AUTH,
                           timeout=10).json()
        assert queued["status"] == "queued", queued
    finally:
        first.stop()
    assert httpx.get(f"{first.url}/healthz", timeout=10).status_code == 404  # the app is gone
    runs = write_config(tmp_path, ray_cluster, "restart",
                        jobs={"db_path": str(tmp_path / "jobs.sqlite"), "poll_s": 0.1})
    again = serve(model, runs, block=False, ready_timeout_s=180)  # no keys
    try:
        done = wait_job(again.url, queued["id"], {})
        assert done["status"] == "succeeded" and done["created_at"] == queued["created_at"]
        assert done["verdict"]["video"]["frames_used"] == 2, done
    finally:
        again.stop()


def test_model_replica_dying_mid_request_is_a_json_503(ray_cluster, model, tmp_path, clip):
    # A batch that waits 60 s to fill holds the lone request inside the model replica, which is
    # then killed: the ingress sees RayActorError and must answer 503, not 500.
    import ray

    config = write_config(tmp_path, ray_cluster, "unavailable",
                          batching={"max_batch_size": 4, "batch_wait_timeout_s": 60})
    srv = serve(model, config, block=False, ready_timeout_s=180)
    try:
        (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["name"].startswith("SERVE_REPLICA::unavailable#GuardModel#")]
        replica = ray.get_actor(name, namespace="serve")
        replies: list[httpx.Response] = []
        request = threading.Thread(target=lambda: replies.append(post_video(srv.url, clip)),
                                   daemon=True)
        request.start()
        deadline = time.monotonic() + 30  # the replica actor's own count, which Serve routes by
        while ray.get(replica.get_num_ongoing_requests.remote(), timeout=10) < 1:
            assert time.monotonic() < deadline, "the request never reached the model replica"
            time.sleep(0.05)
        ray.kill(replica, no_restart=True)
        request.join(timeout=60)
        assert replies, "no reply within 60 s"
        reply = replies[0]
        assert reply.status_code == 503 and reply.headers["retry-after"] == "1", reply.text
        body = reply.json()
        assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
        assert body["error"]["type"] == "unavailable", body
        assert body["error"]["message"].startswith("model replica unavailable"), body
    finally:
        srv.stop()


def test_a_stopping_service_answers_503_until_it_exits(model, tmp_path, clip):
    """SIGTERM to `guardrail serve` on its own Ray: the request in flight still finishes, and
    from the first 503 on every new request is a JSON 503 with Retry-After until Serve stops
    its proxy on the way out (connections are refused from then on), never Serve's 404 for a
    deleted route. A batch that waits 5 s to fill holds the request in flight."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    http = {**DEPLOY["http_options"], "host": "127.0.0.1", "port": port}
    config = write_config(tmp_path, http, batching={"max_batch_size": 4,
                                                    "batch_wait_timeout_s": 5})
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    code = (f"from guardrail.serve.command import serve; serve({model!r}, {str(config)!r}, "
            "ready_timeout_s=180)")
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while not _answers(f"{url}/healthz"):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the service did not start"
            time.sleep(0.5)
        held: list[httpx.Response] = []
        request = threading.Thread(target=lambda: held.append(post_video(url, clip, {})),
                                   daemon=True)
        request.start()
        time.sleep(1.5)                         # uploaded and waiting in the model's batch
        proc.send_signal(signal.SIGTERM)
        replies: list[httpx.Response | str] = []
        in_flight_at_drain = False
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                reply = post_video(url, b"not a video", {})
            except httpx.TransportError as err:
                reply = type(err).__name__
            if not replies and getattr(reply, "status_code", None) == 503:
                in_flight_at_drain = request.is_alive()
            if replies or getattr(reply, "status_code", None) == 503:
                replies.append(reply)           # drain started: count from the first 503
            time.sleep(0.02)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    request.join(timeout=60)
    assert in_flight_at_drain and held and held[0].status_code == 200, held
    answered = [r for r in replies if isinstance(r, httpx.Response)]
    assert len(answered) >= 3, replies
    for r in answered:
        assert r.status_code == 503 and r.headers["retry-after"] == "1", (r.status_code, r.text)
        assert r.json()["error"]["type"] == "unavailable", r.text
    refused = [i for i, r in enumerate(replies) if isinstance(r, str)]
    assert refused == list(range(len(answered), len(replies))), replies   # only at the end


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def wait_job(url: str, job_id: str, headers: dict, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", headers=headers, timeout=10).json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.2)
    pytest.fail(f"job {job_id} did not end in {timeout_s} s")
