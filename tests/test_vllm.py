"""The vllm engine against our runner, on a real vLLM (the CPU build), fp32, tiny random
Qwen2-VL / Qwen2.5-VL models carrying the real Qwen tokenizer.

Runs in the second environment `.ci/vllm-env` builds (`pytest -m vllm` there); the main suite
deselects it. With GUARDRAIL_REQUIRE_VLLM=1 a missing vLLM fails instead of skipping.
"""

from __future__ import annotations

import os

import pytest
import torch
from videos import encode_video

from guardrail.engine import GuardEngine
from guardrail.errors import UsageError, VideoError
from guardrail.tiny import make_tiny
from guardrail.verdict import parse_answer
from guardrail.video import SamplingConfig, load_video

pytestmark = pytest.mark.vllm

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
try:
    import vllm  # noqa: F401
except ImportError:
    if os.environ.get("GUARDRAIL_REQUIRE_VLLM") == "1":
        raise
    pytest.skip("vLLM is not installed (run .ci/vllm-env)", allow_module_level=True)

VLLM = dict(max_model_len=4096, enforce_eager=True, max_num_seqs=32)
LAYOUTS = ("sequential", "isolated")


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def model(request, qwen_tokenizer, tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp(f"vllm-{request.param}"), request.param,
                     tokenizer=qwen_tokenizer)


@pytest.fixture(scope="module")
def engines(model):
    """(our runner, the vllm engine) on the same model, both under `sequential`."""
    ours = GuardEngine.from_pretrained(model, layout="sequential")
    theirs = GuardEngine.from_pretrained(model, layout="sequential", engine="vllm", vllm=VLLM)
    yield ours, theirs
    del theirs


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A 3 s clip (8 of 30 frames: a fractional 0.75 s per temporal patch) and a 60 s clip
    sampled sparsely (8 of 60 frames: 15 s per patch, temporal ids up to 90)."""
    out = tmp_path_factory.mktemp("vllm-clips")
    short, long = out / "short.mp4", out / "long.mp4"
    short.write_bytes(encode_video(num_frames=30, fps=10))
    long.write_bytes(encode_video(num_frames=60, fps=1))
    return {"short": short, "long": long}


def _scores(engine: GuardEngine, path, **changes) -> list[float]:
    eng = engine.with_config(**changes) if changes else engine
    return [c.score for c in eng.check(path).categories]


@pytest.mark.parametrize("clip", ["short", "long"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_scores_equal_our_runner(engines, clips, clip, layout):
    ours, theirs = engines
    want = _scores(ours, clips[clip], layout=layout)
    got = _scores(theirs, clips[clip], layout=layout)
    assert got == pytest.approx(want, abs=1e-4)
    assert max(want) - min(want) > 1e-3                # the categories really differ


def test_prepared_videos_judge_alike(engines, clips):
    """`prepare` (what bench run, check and the service call ahead of the engine) decodes
    only, for the vllm engine: its processor runs inside vLLM."""
    _, theirs = engines
    prepared = theirs.prepare([clips["short"], clips["long"]])
    assert prepared.windows is None
    got = [[c.score for c in v.categories] for v in theirs.check_batch(prepared)]
    want = [_scores(theirs, clips[c]) for c in ("short", "long")]
    assert got == [pytest.approx(w, abs=1e-6) for w in want]


def test_isolated_is_order_invariant(engines, clips):
    _, theirs = engines
    eng = theirs.with_config(layout="isolated")
    cats = eng.policies.categories
    flipped = eng.with_policies(eng.policies.model_copy(update={"categories": cats[::-1]}))
    a = {c.id: c.score for c in eng.check(clips["short"]).categories}
    b = {c.id: c.score for c in flipped.check(clips["short"]).categories}
    assert max(abs(a[k] - b[k]) for k in a) <= 1e-4


def test_windows_batches_and_verdict_shape(engines, clips):
    """Windows of a long video, batched, give the runner's segments and the same JSON keys."""
    ours, theirs = engines
    cfg = dict(sampling=SamplingConfig(num_frames=4, window_s=20.0), batch_size=2)
    a, b = ours.with_config(**cfg).check(clips["long"]), theirs.with_config(**cfg).check(
        clips["long"])
    assert len(b.segments) == len(a.segments) == 3
    for sa, sb in zip(a.segments, b.segments, strict=True):
        assert (sa.start_s, sa.end_s) == (sb.start_s, sb.end_s)
        assert list(sb.scores.values()) == pytest.approx(list(sa.scores.values()), abs=1e-4)
    assert set(b.model_dump()) == set(a.model_dump())
    assert b.layout == "sequential" and b.video.frames_used == a.video.frames_used


@pytest.mark.parametrize("layout", LAYOUTS)
def test_explain_parses_and_its_verdict_is_the_flags(engines, clips, layout):
    _, theirs = engines
    eng = theirs.with_config(layout=layout, mode="explain", max_new_tokens=12)
    v = eng.check(clips["short"])
    assert v.description is not None and v.explanation is not None
    _, rows = eng.judge([load_video(clips["short"]).clips[0]])
    texts, _ = eng._explain(rows, [[c.flagged for c in v.categories]])
    parsed = parse_answer(texts[0].text, [(c.id, c.name) for c in eng.policies.categories])
    assert parsed.ok and parsed.flags == {c.id: c.flagged for c in v.categories}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_explain_text_equals_our_runner(engines, clips, layout):
    ours, theirs = engines
    a = ours.with_config(mode="explain", max_new_tokens=12, layout=layout).check(clips["short"])
    b = theirs.with_config(mode="explain", max_new_tokens=12, layout=layout).check(
        clips["short"])
    assert (b.description, b.explanation) == (a.description, a.explanation)


def test_explain_with_a_one_token_budget(engines, clips):
    """The explanation line may get no tokens at all: empty, as in our runner, not an error."""
    ours, theirs = engines
    a = ours.with_config(mode="explain", max_new_tokens=1).check(clips["short"])
    b = theirs.with_config(mode="explain", max_new_tokens=1).check(clips["short"])
    assert (b.description, b.explanation) == (a.description, a.explanation)
    assert b.explanation == ""


def test_a_window_too_long_for_max_model_len_is_a_typed_error(model, clips):
    """A video that makes a request longer than max_model_len: one line naming max_model_len
    (PromptTooLongError, 413 in the service), not vLLM's validation error and a traceback. In
    a process of its own, like the check command test below."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "guardrail.cli", "check", str(clips["long"]),
                          "--model", str(model), "--engine", "vllm", "--layout", "isolated",
                          "--frames", "32", "--vllm-option", "max_model_len=470",  # 8 frames: 431
                          "--vllm-option", "enforce_eager=true"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 2, res.stderr[-3000:]
    ours = [line for line in res.stderr.splitlines() if "max_model_len 470" in line]
    assert len(ours) == 1 and "does not fit" in ours[0] and "Traceback" not in res.stderr


def test_bad_video_is_the_same_typed_error(engines, tmp_path):
    ours, theirs = engines
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(512))
    errors = []
    for eng in (ours, theirs):
        with pytest.raises(VideoError) as err:
            eng.check(bad)
        errors.append((type(err.value), str(err.value)))
    assert errors[0] == errors[1]


@pytest.mark.parametrize("change", [dict(layout="parallel"), dict(layout="parallel_cached"),
                                    dict(keep_ratio=0.5)])
def test_what_vllm_cannot_run_is_a_usage_error(engines, change):
    _, theirs = engines
    with pytest.raises(UsageError, match="sequential and isolated|engine transformers"):
        theirs.with_config(**change)


def test_prefix_is_computed_once_per_window(engines, clips):
    """Sent together, as the engine sends them, the category requests of a new window reuse
    its shared prefix (full 128-token CPU blocks) from the first one."""
    _, theirs = engines
    eng = theirs.with_config(layout="isolated")
    theirs.adapter.llm.reset_prefix_cache()
    asks, _ = eng._requests(load_video(clips["long"]).clips[0])
    outs = eng._generate(asks, None)
    cached = torch.tensor([o.num_cached_tokens for o in outs])
    assert int(cached[0]) == 0 and int(cached[1:].min()) >= 128


def test_calibration_applies_alike(engines, clips, tmp_path):
    """A calibration file moves both engines' scores the same way."""
    import numpy as np

    from guardrail.calibration import fit, save

    ours, theirs = engines
    ids = [c.id for c in ours.policies.categories]
    rng = np.random.default_rng(0)
    raw = rng.uniform(0.3, 0.7, size=(200, len(ids)))
    cal = fit(raw, (rng.uniform(size=raw.shape) < 0.2).astype(int), ids, "platt")
    save(cal, tmp_path / "cal.json")
    a = type(ours)(ours.adapter, ours.policies, ours.config, calibration=cal)
    b = type(theirs)(theirs.adapter, theirs.policies, theirs.config, calibration=cal)
    va, vb = a.check(clips["short"]), b.check(clips["short"])
    assert va.calibrated and vb.calibrated
    assert [c.score for c in vb.categories] == pytest.approx([c.score for c in va.categories],
                                                             abs=1e-4)
    raw_b = [c.score for c in theirs.check(clips["short"]).categories]
    assert max(abs(x - y) for x, y in zip(raw_b, [c.score for c in vb.categories],
                                          strict=True)) > 1e-3


def test_check_command_with_engine_vllm(model, engines, clips):
    """`guardrail check --engine vllm --json` in a process of its own prints what the Python
    API gives. (Not in this process: a second vLLM engine here would tear down the globals of
    the fixture's engine when it is freed.)"""
    import json
    import subprocess
    import sys

    _, theirs = engines
    want = theirs.with_config(layout="isolated").check(clips["short"])
    opts = [f"--vllm-option={k}={json.dumps(v)}" for k, v in VLLM.items()]
    res = subprocess.run([sys.executable, "-m", "guardrail.cli", "check", str(clips["short"]),
                          "--model", str(model), "--engine", "vllm", "--layout", "isolated",
                          "--json", *opts], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["layout"] == "isolated"
    assert [c["score"] for c in got["categories"]] == pytest.approx(
        [c.score for c in want.categories], abs=1e-6)


@pytest.mark.parametrize("backend", ["local", pytest.param("ray", marks=pytest.mark.ray)])
def test_serve_with_engine_vllm_answers_both_apis(model, tmp_path, clips, backend):
    """`guardrail serve` with deploy/serve-vllm.yaml (its vLLM settings swapped for CPU ones)
    answers /v1/moderate and the OpenAI-style /v1/moderations from vLLM's engine, in process
    (local) and in a Ray Serve model replica (ray). Last in the module: the in-process server's
    vLLM engine, once freed, tears down vLLM's process-wide state under the fixture's engine."""
    import base64
    import socket
    from pathlib import Path

    import httpx
    import openai
    import yaml

    from guardrail.serve.command import serve

    cfg = yaml.safe_load((Path(__file__).parents[1] / "deploy" / "serve-vllm.yaml").read_text())
    args = cfg["applications"][0]["args"]
    assert args["engine"] == "vllm" and args["layout"] == "isolated"
    args["vllm"] = dict(VLLM, distributed_executor_backend="uni")
    for dep in cfg["applications"][0]["deployments"]:     # a 2-CPU Ray
        dep["ray_actor_options"]["num_cpus"] = 1 if dep["name"] == "GuardModel" else 0.5
    path = tmp_path / "serve-vllm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    port = 0
    if backend == "ray":              # Ray's proxy needs a real port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    server = serve(str(model), config=path, port=port, backend=backend, block=False,
                   num_gpus=0 if backend == "ray" else None,
                   jobs_db=str(tmp_path / "jobs.sqlite"), ready_timeout_s=600)
    try:
        with clips["short"].open("rb") as f:
            r = httpx.post(f"{server.url}/v1/moderate", files={"file": ("a.mp4", f)},
                           timeout=300)
        assert r.status_code == 200, r.text
        verdict = r.json()
        assert verdict["layout"] == "isolated" and len(verdict["categories"]) == 6
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                               timeout=300)
        mp4 = base64.b64encode(clips["short"].read_bytes()).decode()
        result = client.moderations.create(model="guardrail", input=[
            {"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{mp4}"}}])
        scores = result.results[0].category_scores.model_extra
        want = {c["name"]: c["score"] for c in verdict["categories"]}
        assert scores == pytest.approx(want, abs=1e-6)
        r = httpx.post(f"{server.url}/v1/moderate", files={"file": ("a.mp4", b"not a video")},
                       timeout=60)
        assert r.status_code in (400, 415, 422) and "error" in r.json()
    finally:
        server.stop()
