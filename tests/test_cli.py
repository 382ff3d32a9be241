"""The `guardrail` command as users run it (SPEC §5): exit codes, one-line errors, JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from guardrail.cli import app
from guardrail.verdict import Verdict

ROOT = Path(__file__).resolve().parents[1]
POLICIES = sorted((ROOT / "policies").glob("*.yaml"))
runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_policy_validate_ok():
    res = run("policy", "validate", *POLICIES)
    assert res.exit_code == 0, res.output
    assert res.stdout.count("ok ") == len(POLICIES) >= 4


def test_policy_validate_errors_point_at_lines(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nversion: 1\ncategories:\n  - id: C1\n    name: A\n"
                   "    blocked: [r]\n    threshold: 1.5\n")
    res = run("policy", "validate", bad, POLICIES[0])
    assert res.exit_code == 2
    assert f"{bad}:7: categories[0].threshold: must be in (0, 1)" in res.stderr
    assert "Traceback" not in res.output
    assert f"ok {POLICIES[0]}" in res.stdout


def test_policy_validate_refuses_python_tags(tmp_path):
    bad = tmp_path / "evil.yaml"
    bad.write_text('name: !!python/object/apply:os.system ["echo pwned"]\nversion: 1\n')
    res = run("policy", "validate", bad)
    assert res.exit_code == 2 and "pwned" not in res.stdout
    assert res.stderr.startswith(f"{bad}:1:")


@pytest.mark.parametrize("layout", ["sequential", "parallel", "parallel_cached"])
def test_policy_render(layout):
    res = run("policy", "render", ROOT / "policies" / "safewatch.yaml", "--layout", layout)
    assert res.exit_code == 0
    assert res.stdout.count("<box>") == 12  # six chunks, then the six again in the full prompt
    assert 'GUARDRAIL: {"C3(Threats, Violence & Harm)":' in res.stdout


def test_video_probe_json(video_files):
    res = run("video", "probe", video_files["mp4_h264"], "--frames", "4", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["codec"] == "h264" and data["width"] == 64 and data["height"] == 48
    assert data["fps"] == pytest.approx(10) and data["duration_s"] == pytest.approx(3, abs=0.15)
    assert len(data["windows"]) == 1 and len(data["windows"][0]["indices"]) == 4


def test_video_probe_bad_input_exits_3(tmp_path):
    bad = tmp_path / "notes.mp4"
    bad.write_text("this is not a video\n" * 20)
    res = run("video", "probe", bad)
    assert res.exit_code == 3
    assert res.stderr.startswith(f"{bad}: ") and res.stderr.count("\n") == 1
    assert "Traceback" not in res.output


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "m"
    res = run("model", "make-tiny", path, "--family", "qwen2_5_vl")
    assert res.exit_code == 0, res.output
    return path


def test_check_json_and_bad_video(tiny_dir, video_files, tmp_path):
    bad = tmp_path / "empty.mp4"
    bad.write_bytes(b"")
    res = run("check", video_files["mp4_h264"], bad, video_files["webm_vp9"], "--model", tiny_dir,
              "--json")
    assert res.exit_code == 3
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 2
    verdicts = [Verdict.model_validate_json(line) for line in lines]
    assert all(v.model == str(tiny_dir) and v.policy_set == "safewatch" for v in verdicts)
    assert res.stderr.startswith(f"{bad}: ") and res.stderr.count("\n") == 1


def test_check_table_and_usage_errors(tiny_dir, video_files):
    res = run("check", video_files["mp4_h264"], "--model", tiny_dir)
    assert res.exit_code == 0, res.output
    assert "Sexual Content" in res.stdout and "threshold" in res.stdout
    res = run("check", video_files["mp4_h264"], "--model", tiny_dir, "--layout", "diagonal")
    assert res.exit_code == 2 and "unknown layout" in res.stderr


def test_check_missing_model_fails_fast(video_files, tmp_path):
    res = run("check", video_files["mp4_h264"], "--model", tmp_path / "nope")
    assert res.exit_code == 2
    assert "make-tiny" in res.stderr and "Traceback" not in res.output


def test_console_script_runs():
    res = subprocess.run([sys.executable, "-m", "guardrail.cli", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and "check" in res.stdout
