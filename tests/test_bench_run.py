"""`guardrail bench run | score` end to end on generated videos with a tiny random model: outputs
and their fixed keys, failures reported not fatal, resume after an interruption (a cut file and a
really killed process), Ray equal to local, and several runs side by side."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import videos
from test_bench_metrics import CASE_A, CASE_A_EXPECTED, get, write_case
from typer.testing import CliRunner

from guardrail.bench.command import bench_app
from guardrail.bench.datasets import load_dataset
from guardrail.bench.predictions import read_predictions
from guardrail.bench.runner import EngineSpec, RayOptions, run
from guardrail.errors import UsageError
from guardrail.policy import load_policy

POLICY = Path(__file__).resolve().parents[1] / "policies" / "safewatch.yaml"
FIXED = ["safewatch.acc", "safewatch.f1", "safewatch.auprc", "micro.precision", "micro.recall",
         "micro.f1", "macro.precision", "macro.recall", "macro.f1", "binary.accuracy",
         "binary.precision", "binary.recall", "binary.f1", "binary.fpr", "binary.auprc",
         "binary.auroc", "calibration.ece"]
PER_CATEGORY = ["acc", "precision", "recall", "f1", "ap"]


@pytest.fixture(scope="module")
def model(tiny_model) -> Path:
    return tiny_model("qwen2_5_vl")


def _video(root: Path, name: str, frames: int) -> None:
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    videos.write((root / name).parent, Path(name).name,
                 videos.encode_video("mp4_h264", num_frames=frames, fps=4))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """SafeWatch layout: 4 readable videos, one corrupt, one missing."""
    root = tmp_path_factory.mktemp("safewatch")
    for name, frames in [("a", 8), ("b", 10), ("c", 12), ("d", 14)]:
        _video(root, f"real/videos/{name}.mp4", frames)
    (root / "real/videos/bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    sets = {"C1/evident": [("a", [1]), ("b", [1, 3])], "C1/benign": [("c", []), ("bad", [])],
            "C3/fighting": [("d", [3]), ("gone", [3])]}
    for key, items in sets.items():
        path = root / "real" / f"{key}_benchmark.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([{"video_path": f"real/videos/{v}.mp4", "labels": labels}
                                    for v, labels in items]))
    return root


def spec(model: Path, **options) -> EngineSpec:
    return EngineSpec(str(model), load_policy(POLICY), "cpu", "auto", tuple(options.items()))


@pytest.fixture(scope="module")
def local_run(model, dataset, tmp_path_factory) -> Path:
    """`guardrail bench run` once, locally, through the command line."""
    out = tmp_path_factory.mktemp("local")
    res = CliRunner().invoke(bench_app, ["run", "--dataset", str(dataset), "--model", str(model),
                                         "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "judged 4 videos, 2 failed, 0 already done" in res.stderr
    assert "SafeWatch ACC" in res.stdout
    return out


def scores_by_video(path: Path) -> dict[str, list[float]]:
    preds, bad = read_predictions(path)
    assert bad == 0
    return {k: [c.score for c in p.verdict.categories] for k, p in preds.items()}


def test_bench_run_end_to_end(model, dataset, local_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(local_run, out)
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(x["video_path"] for x in lines) == [f"real/videos/{v}.mp4" for v in "abcd"]
    by = {x["video_path"]: x for x in lines}
    assert by["real/videos/b.mp4"]["labels"] == ["C1", "C3"]
    assert by["real/videos/c.mp4"]["labels"] == []
    assert [c["id"] for c in lines[0]["categories"]] == [f"C{i}" for i in range(1, 7)]
    m = json.loads((out / "metrics.json").read_text())
    for key in FIXED:
        assert 0.0 <= get(m, key) <= 1.0, key
    for cid in ("C1", "C2", "C3", "C4", "C5", "C6"):
        for key in PER_CATEGORY:
            assert 0.0 <= m["per_category"][cid][key] <= 1.0
    assert m["n_videos"] == 4 and m["throughput"]["videos_per_s"] > 0
    assert m["n_failed"] == 2
    failed = {f["video_path"]: f["error"]["type"] for f in m["failed"]}
    assert failed.keys() == {"real/videos/bad.mp4", "real/videos/gone.mp4"}
    assert failed["real/videos/gone.mp4"] == "missing"
    assert failed["real/videos/bad.mp4"] in ("invalid_video", "unsupported_media")
    assert m["settings"]["model"] == str(model) and m["settings"]["frames"] == 8
    report = (out / "report.md").read_text()
    for png in ("per_category_f1.png", "binary_pr_curve.png", "reliability.png"):
        assert f"]({png})" in report
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Per subcategory" in report and "| C3 | fighting | 1 |" in report
    assert "real/videos/gone.mp4" in report
    # a random test model says so wherever results are shown, not only per prediction line
    assert m["warnings"] and m["warnings"][0].startswith("random test model")
    assert report.splitlines()[2] == f"> **Warning:** {m['warnings'][0]}"
    # Running again with everything done judges nothing and rescores the same.
    again = CliRunner().invoke(bench_app, ["run", "--dataset", str(dataset), "--model",
                                           str(model), "--out", str(out), "--device", "cpu"])
    assert again.exit_code == 0, again.output
    assert "judged 0 videos, 2 failed, 4 already done" in again.stderr
    assert "warning: random test model" in " ".join(again.stdout.split())
    m2 = json.loads((out / "metrics.json").read_text())
    assert m2["safewatch"] == m["safewatch"]
    # throughput: judged videos only (4, not the 2 failed), unchanged by the no-op resume
    assert m["throughput"]["videos_timed"] == 4
    assert m2["throughput"] == m["throughput"]
    # scored later without the dataset, the run's failure list still counts
    rescored = _score(out)
    assert rescored["n_failed"] == 2
    assert {f["video_path"] for f in rescored["failed"]} == failed.keys()


def test_resume_after_a_cut_file(model, dataset, local_run, tmp_path):
    full = (local_run / "predictions.jsonl").read_text().splitlines(keepends=True)
    out = tmp_path / "resumed"
    out.mkdir()
    # Two complete lines, then a line cut mid-way (the process died while writing it).
    (out / "predictions.jsonl").write_text("".join(full[:2]) + full[2][: len(full[2]) // 2])
    seen = []
    # batch=3: [c, bad, d] share one check_batch call (bad fails alone), then [gone].
    result = run(load_dataset(dataset), spec(model), out, batch=3,
                 on_done=lambda o: seen.append(o))
    assert (result.judged, result.failed, result.skipped) == (2, 2, 2)
    done_before = {json.loads(x)["video_path"] for x in full[:2]}
    assert not done_before & {o.video_path for o in seen if o.verdict}
    got, want = (scores_by_video(p / "predictions.jsonl") for p in (out, local_run))
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(x) for x in lines)


def test_resume_refuses_other_settings(model, dataset, local_run, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(local_run, out)
    with pytest.raises(UsageError, match="other settings.*layout"):
        run(load_dataset(dataset), spec(model, layout="sequential"), out)


@pytest.mark.slow
def test_resume_after_a_killed_process(model, tmp_path):
    root = tmp_path / "set"
    names = [f"v{i:02d}.mp4" for i in range(6)]
    for i, name in enumerate(names):
        _video(root, name, 8 + i)
    (root / "manifest.jsonl").write_text("".join(
        json.dumps({"video": n, "labels": ["C3"] if i % 2 else []}) + "\n"
        for i, n in enumerate(names)))
    out = tmp_path / "out"
    args = ["run", "--dataset", str(root), "--model", str(model), "--out", str(out),
            "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "guardrail.bench.command", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    preds = out / "predictions.jsonl"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if preds.is_file() and preds.read_text().count("\n") >= 1:
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    before = [json.loads(x)["video_path"] for x in preds.read_text().splitlines()
              if x.endswith("}")]
    assert 1 <= len(before) < len(names)
    res = CliRunner().invoke(bench_app, args)
    assert res.exit_code == 0, res.output
    assert f"judged {len(names) - len(before)} videos, 0 failed, {len(before)} already" \
        in res.stderr
    after = [json.loads(x)["video_path"] for x in preds.read_text().splitlines()]
    assert sorted(after) == names and after[: len(before)] == before


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_ray_run_equals_local_run(model, dataset, local_run, tmp_path):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    try:
        result = run(load_dataset(dataset), spec(model), tmp_path / "ray",
                     ray=RayOptions(workers=2, num_cpus=1), batch=2)
    finally:
        ray.shutdown()
    assert (result.judged, result.failed) == (4, 2)
    local, remote = (read_predictions(p / "predictions.jsonl")[0]
                     for p in (local_run, tmp_path / "ray"))
    assert set(local) == set(remote)
    for key, p in local.items():
        q = remote[key]
        assert q.verdict.flagged_ids() == p.verdict.flagged_ids()
        assert [c.score for c in q.verdict.categories] == pytest.approx(
            [c.score for c in p.verdict.categories], abs=1e-6)
        assert q.labels == p.labels
    want, got = _score(local_run), _score(tmp_path / "ray")
    for key in ["n_videos", "n_failed", "safewatch", "per_category", "micro", "macro", "binary",
                "calibration"]:
        assert flatten(got[key]) == pytest.approx(flatten(want[key]), abs=1e-6), key


def flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, value in tree.items()
            for k, v in flatten(value, f"{prefix}{key}.").items()}


def _score(out: Path) -> dict:
    res = CliRunner().invoke(bench_app, ["score", "--predictions", str(out / "predictions.jsonl"),
                                         "--out", str(out / "scored"), "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_bench_score_reproduces_hand_computed_values(tmp_path):
    root, preds = write_case(CASE_A, tmp_path / "data", tmp_path / "run")
    res = CliRunner().invoke(bench_app, ["score", "--dataset", str(root), "--predictions",
                                         str(preds), "--out", str(tmp_path / "scored")])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "scored/metrics.json").read_text())
    for key, want in CASE_A_EXPECTED.items():
        assert get(m, key) == pytest.approx(want, abs=1e-12), key
    assert m["n_failed"] == 0
    assert m["throughput"]["videos_per_s"] == pytest.approx(4.0)   # 1 / 250 ms, no run record
    assert (tmp_path / "scored/report.md").is_file()


def test_bench_score_compares_several_runs(tmp_path):
    root, first = write_case(CASE_A, tmp_path / "data", tmp_path / "parallel")
    _, second = write_case(CASE_A[:-1], tmp_path / "data2", tmp_path / "sequential", shift=0.15)
    out = tmp_path / "cmp"
    res = CliRunner().invoke(bench_app, ["score", "--dataset", str(root), "--predictions",
                                         str(first), "--predictions", str(second), "--out",
                                         str(out)])
    assert res.exit_code == 0, res.output
    assert res.stdout.count("SafeWatch ACC") == 1
    header = next(line for line in res.stdout.splitlines() if "parallel" in line)
    assert "sequential" in header
    table = (out / "comparison.md").read_text()
    assert "| metric | parallel | sequential |" in table
    assert "| videos | 7 | 7 |" in table          # scored on the videos both runs have
    for name in ("parallel", "sequential"):
        m = json.loads((out / name / "metrics.json").read_text())
        assert m["n_videos"] == 7 and m["n_failed"] == 0
        assert (out / name / "report.md").is_file()


def test_decoding_ahead_changes_no_prediction(model, dataset, local_run, tmp_path):
    """The default run decodes groups ahead of the engine; with --prefetch 0 each group is
    decoded when the engine is ready for it: the same predictions and failures either way
    (batches of 2: groups mix readable, corrupt and missing videos)."""
    outs = {}
    for ahead in ("0", "2"):
        out = tmp_path / f"ahead{ahead}"
        res = CliRunner().invoke(bench_app, ["run", "--dataset", str(dataset), "--model",
                                             str(model), "--out", str(out), "--device", "cpu",
                                             "--batch-size", "2", "--prefetch", ahead])
        assert res.exit_code == 0, res.output
        assert "judged 4 videos, 2 failed" in res.stderr and "waiting for decoded" in res.stderr
        outs[ahead] = out
    serial, ahead = (scores_by_video(outs[a] / "predictions.jsonl") for a in ("0", "2"))
    assert serial.keys() == ahead.keys() == scores_by_video(local_run / "predictions.jsonl").keys()
    for video, scores in serial.items():
        assert scores == pytest.approx(ahead[video], abs=1e-6)
    failed = [json.loads(x)["video_path"] for x in (outs["2"] / "failed.jsonl").read_text()
              .splitlines()]
    assert sorted(failed) == ["real/videos/bad.mp4", "real/videos/gone.mp4"]
