"""`serve(...)` (the `guardrail serve` command) and the files in deploy/, without Ray."""

from __future__ import annotations

import base64
import socket
from pathlib import Path

import httpx
import openai
import pytest
import videos
import yaml
from ray.serve.schema import ServeDeploySchema

from guardrail.errors import UsageError
from guardrail.serve.command import load_config, serve
from guardrail.serve.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[1]


def test_deploy_serve_yaml_is_a_valid_serve_config():
    cfg = load_config(ROOT / "deploy" / "serve.yaml")
    assert (cfg.host, cfg.port, cfg.app_name) == ("127.0.0.1", 8000, "guardrail")
    assert cfg.settings.host == "127.0.0.1" and cfg.settings.policy_set == "safewatch"
    assert Path(cfg.settings.jobs.db_path).is_absolute()
    assert set(cfg.deployments) == {"GuardIngress", "GuardModel"}
    assert cfg.deployments["GuardModel"]["max_queued_requests"] > 0  # bounded queue


def test_rayservice_embeds_a_valid_serve_config():
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "rayservice.yaml").read_text()))
    service = next(d for d in docs if d["kind"] == "RayService")
    serve_cfg = yaml.safe_load(service["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(serve_cfg)
    app = serve_cfg["applications"][0]
    settings = ServiceSettings.model_validate(app["args"])
    assert schema.http_options.host == settings.host == "0.0.0.0"
    model = next(d for d in app["deployments"] if d["name"] == "GuardModel")
    assert model["ray_actor_options"]["num_gpus"] == 1 and model["max_queued_requests"] > 0
    ingress = next(d for d in app["deployments"] if d["name"] == "GuardIngress")
    assert ingress["num_replicas"] > 1 and "resources" not in ingress["ray_actor_options"]
    assert "db_path" not in settings.jobs.model_fields_set      # the store is PostgreSQL
    pods = [service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"],
            *(g["template"] for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"])]
    for pod in pods:
        env = {e["name"] for c in pod["spec"]["containers"] for e in c.get("env", [])}
        assert {"GUARDRAIL_DB_URL", "GUARDRAIL_API_KEYS"} <= env


def test_overrides_and_bad_configs(tmp_path):
    cfg = load_config(ROOT / "deploy" / "serve.yaml", model="/m", host="0.0.0.0", port=9,
                      api_keys=["k"], jobs_db=str(tmp_path / "j.sqlite"))
    assert (cfg.host, cfg.port) == ("0.0.0.0", 9)
    assert cfg.settings.model == "/m" and cfg.settings.host == "0.0.0.0"
    assert cfg.settings.jobs.db_path == str(tmp_path / "j.sqlite")
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications:\n  - import_path: x:y\n    args: {frames: 0}\n")
    with pytest.raises(UsageError, match=r"bad.yaml:3: applications\[0\].args.frames: "):
        load_config(bad)
    bad.write_text("applications: 3\n")
    with pytest.raises(UsageError, match="bad.yaml:1: applications: .*list"):
        load_config(bad)
    with pytest.raises(UsageError, match="cannot read the Serve config"):
        load_config(tmp_path / "missing.yaml")


def test_unknown_keys_anywhere_in_the_serve_file_name_key_and_line(tmp_path):
    text = (ROOT / "deploy" / "serve.yaml").read_text()
    lines = text.splitlines()
    typos = {"http_options:": "http_option:", "      frames: 8": "      frame: 8",
             "        max_upload_bytes:": "        max_upload:",
             "        num_replicas: 1": "        num_replica: 1"}
    for right, wrong in typos.items():
        bad = tmp_path / "typo.yaml"
        bad.write_text(text.replace(right, wrong, 1))
        line = next(i for i, x in enumerate(lines, 1) if x.startswith(right))
        with pytest.raises(UsageError) as got:
            load_config(bad)
        message = str(got.value)
        key = wrong.strip().rstrip(":").split(":")[0]
        assert message.startswith(f"{bad}:{line}: ") and f"{key}: unknown key" in message, message
        assert "did you mean" in message and "://" not in message
        assert "\n" not in message and "pydantic" not in message
    bad.write_text(text.replace("      frames: 8", "      frames: many", 1))
    with pytest.raises(UsageError) as got:
        load_config(bad)
    assert "applications[0].args.frames: Input should be a valid integer" in str(got.value)
    assert "errors.pydantic.dev" not in str(got.value)


def test_refuses_other_interfaces_without_keys(monkeypatch):
    monkeypatch.delenv("GUARDRAIL_API_KEYS", raising=False)
    with pytest.raises(UsageError, match="needs API keys"):
        serve("/nonexistent", host="0.0.0.0", port=0, block=False)


def test_port_0_means_local_backend_and_a_taken_port_is_refused():
    assert load_config(ROOT / "deploy" / "serve.yaml", port=0).port == 0
    with pytest.raises(UsageError, match="port 0 .* needs backend local"):
        serve("/nonexistent", port=0, block=False)  # Ray's proxy cannot report its port
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UsageError, match=f"cannot listen on 127.0.0.1:{port}"):
            serve("/nonexistent", port=port, backend="local", block=False)


def test_local_backend_serves_the_openai_client(tmp_path, tiny_model, video_files):
    model = tiny_model("qwen2_5_vl")
    server = serve(str(model), port=0, backend="local", block=False,  # the server binds a port
                   jobs_db=str(tmp_path / "jobs.sqlite"), ready_timeout_s=120)
    try:
        assert int(server.url.rsplit(":", 1)[1]) > 0, server.url
        assert httpx.get(f"{server.url}/healthz", timeout=10).json()["status"] == "ok"
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        mp4 = base64.b64encode(video_files["webm_vp9"].read_bytes()).decode()
        png = base64.b64encode(videos.encode_png()).decode()
        result = client.moderations.create(model="guardrail", input=[
            {"type": "video_url", "video_url": {"url": f"data:video/webm;base64,{mp4}"}},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}])
        assert len(result.results) == 2 and result.model == str(model)
        assert set(result.results[0].category_scores.model_extra) >= {"Sexual Content"}
    finally:
        server.stop()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{server.url}/healthz", timeout=2)


SERVE_UNTIL_SIGTERM = """
import sys
from guardrail.serve.command import serve
model, port, db, backend = sys.argv[1:5]
serve(model, port=int(port), backend=backend, jobs_db=db, ready_timeout_s=300)
print("exited cleanly", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", pytest.param("ray", marks=pytest.mark.ray)])
def test_sigterm_drains_in_flight_requests(tmp_path, tiny_model, video_files, backend):
    import re
    import signal
    import socket
    import subprocess
    import sys
    import threading
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", SERVE_UNTIL_SIGTERM, str(tiny_model()),
                             str(port), str(tmp_path / "jobs.sqlite"), backend],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    err = ""
    try:
        deadline = time.monotonic() + 300
        while True:                                           # ready when /healthz is 200
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        clip = video_files["mp4_h264"].read_bytes()
        statuses: list[int] = []

        def one() -> None:
            reply = httpx.post(f"{url}/v1/moderate", timeout=120,
                               files={"file": ("v.mp4", clip, "video/mp4")},
                               data={"mode": "explain"})
            statuses.append(reply.status_code)

        clients = [threading.Thread(target=one) for _ in range(8)]
        for t in clients:
            t.start()
        while True:                                           # all 8 are in the service
            text = httpx.get(f"{url}/metrics", timeout=5).text
            inflight = re.search(r'guardrail_queue_depth\{queue="requests"\} ([\d.]+)', text)
            if inflight and float(inflight.group(1)) >= 8:
                break
            assert time.monotonic() < deadline and len(statuses) < 8, "requests not in flight"
        proc.send_signal(signal.SIGTERM)
        for t in clients:
            t.join(timeout=120)
        try:                                                  # no longer serving: draining
            health = httpx.get(f"{url}/healthz", timeout=2).status_code    # (503), app gone
        except httpx.HTTPError:                               # from Ray's proxy (404),
            health = None                                     # or closed (local)
        assert health in (None, 404, 503)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert statuses == [200] * 8, (proc.returncode, err[-3000:])   # all in flight answered
    if backend == "local":
        assert proc.returncode == 0 and "exited cleanly" in out
    else:   # NOTE: Ray's shutdown sometimes ends the driver with status 15 after the drain
        assert proc.returncode in (0, 15), proc.returncode


def test_vllm_serve_files_are_valid_serve_configs():
    """The vLLM examples in deploy/: engine vllm, a layout vLLM runs, vLLM settings passed
    through, and the model replica's GPUs equal to the tensor-parallel size."""
    cfg = load_config(ROOT / "deploy" / "serve-vllm.yaml")
    assert cfg.settings.engine == "vllm" and cfg.settings.layout == "isolated"
    gpus = cfg.deployments["GuardModel"]["ray_actor_options"]["num_gpus"]
    assert gpus == cfg.settings.vllm["tensor_parallel_size"] == 1
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "rayservice-vllm.yaml").read_text()))
    service = next(d for d in docs if d["kind"] == "RayService")
    serve_cfg = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_cfg)
    app = serve_cfg["applications"][0]
    settings = ServiceSettings.model_validate(app["args"])
    model = next(d for d in app["deployments"] if d["name"] == "GuardModel")
    assert settings.engine == "vllm"
    assert model["ray_actor_options"]["num_gpus"] == settings.vllm["tensor_parallel_size"] == 2


@pytest.mark.parametrize("args,message", [
    ({"engine": "vllm", "layout": "parallel"}, "sequential and isolated"),
    ({"engine": "vllm", "layout": "sequential", "keep_ratio": 0.5}, "engine transformers"),
    ({"vllm": {"max_model_len": 4096}}, "engine: vllm only"),
])
def test_settings_refuse_what_the_engine_cannot_run(args, message):
    with pytest.raises(ValueError, match=message):
        ServiceSettings.model_validate(args)


def test_serve_with_a_missing_model_is_one_line_before_ray_starts(tmp_path):
    """The model is located and its config read in the driver: exit 2 with the same line as
    `check`, and no Ray (it took 100 s and three tracebacks before)."""
    import subprocess
    import sys

    probe = ("import sys\nfrom guardrail.cli import main\nsys.argv = ['guardrail', *sys.argv[1:]]"
             "\ntry:\n    main()\nexcept SystemExit as e:\n    print('ray' in sys.modules and "
             "sys.modules['ray'].is_initialized(), file=sys.stderr)\n    raise\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    got = subprocess.run([sys.executable, "-c", probe, "serve", "--model", str(tmp_path / "nope"),
                          "--port", str(port)], capture_output=True, text=True, timeout=120)
    lines = got.stderr.strip().splitlines()
    assert got.returncode == 2, got.stderr[-2000:]
    assert lines == [f"{tmp_path / 'nope'}: no such model directory; make a test model "
                     "with `guardrail model make-tiny DIR --family qwen2_5_vl`", "False"], lines
