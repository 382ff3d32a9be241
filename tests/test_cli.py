"""The `guardrail` command as users run it (SPEC §5): exit codes, one-line errors, JSON."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import videos
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


def test_policy_render_prints_the_exact_prompt_unwrapped(tmp_path):
    from guardrail.policy import load_policy
    from guardrail.prompt import build_prompt, render_prompt

    long_rule = "Footage that " + "shows a very specific and lengthy situation " * 8 + "end."
    policy = tmp_path / "long.yaml"
    policy.write_text(f"name: long\nversion: 1\ncategories:\n"
                      f"  - {{id: L1, name: Long, blocked: [{json.dumps(long_rule)}]}}\n")
    got = subprocess.run([sys.executable, "-c", "from guardrail.cli import main; main()",
                          "policy", "render", str(policy)], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "40"}, timeout=120)
    assert got.returncode == 0, got.stderr
    prompt = build_prompt(load_policy(policy))
    assert render_prompt(prompt, "parallel") in got.stdout       # byte for byte, one piece
    assert long_rule in got.stdout and all(c in got.stdout for c in prompt.chunks)


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


def test_check_engine_choices_are_usage_errors(tiny_dir, video_files):
    """Unknown engines, layouts vLLM cannot run, malformed or misplaced vLLM settings, and a
    missing vLLM: exit 2 with one line, before any model loads."""
    clip = video_files["mp4_h264"]
    cases = [(["--engine", "turbo"], "unknown engine 'turbo'"),
             (["--engine", "vllm", "--layout", "parallel"], "sequential and isolated"),
             (["--engine", "vllm", "--layout", "sequential", "--keep-ratio", "0.5"],
              "engine transformers"),
             (["--vllm-option", "max_model_len"], "expected KEY=VALUE"),
             (["--vllm-option", "max_model_len=4096"], "vllm engine only")]
    if importlib.util.find_spec("vllm") is None:
        cases.append((["--engine", "vllm", "--layout", "isolated"], "pip install vllm"))
    for extra, message in cases:
        res = run("check", clip, "--model", tiny_dir, *extra)
        assert res.exit_code == 2, (extra, res.output)
        assert message in res.stderr and "Traceback" not in res.output, (extra, res.stderr)


def test_check_engine_vllm_refuses_qwen3_vl(tiny_model, video_files):
    res = run("check", video_files["mp4_h264"], "--model", tiny_model("qwen3_vl"), "--engine",
              "vllm", "--layout", "isolated")
    assert res.exit_code == 2 and "use --engine transformers" in res.stderr, res.output


def test_vllm_settings_read_json_values():
    from guardrail.console import vllm_settings

    assert vllm_settings(None) is None
    assert vllm_settings(["tensor_parallel_size=2", "enforce_eager=true", "dtype=bfloat16",
                          "limit_mm_per_prompt={\"video\": 1}"]) == {
        "tensor_parallel_size": 2, "enforce_eager": True, "dtype": "bfloat16",
        "limit_mm_per_prompt": {"video": 1}}


def test_probe_and_check_judge_a_variable_frame_rate_video_over_its_playback(tiny_dir,
                                                                              tmp_path):
    """300 green frames in 0.3 s, then red held to 50 minutes: probe and check report the
    3,000 s of playback and sample it by presentation time (all 8 frames in the red part)."""
    path = tmp_path / "vfr.mkv"
    path.write_bytes(videos.green_then_red_for_50_minutes())
    res = run("video", "probe", path, "--json")
    assert res.exit_code == 0, res.output
    probed = json.loads(res.stdout)
    assert probed["duration_s"] == pytest.approx(3000.3, abs=0.05)
    assert all(t > 0.3 for t in probed["windows"][0]["timestamps_s"])
    res = run("video", "probe", path, "--json", "--sampling", "coverage")
    assert json.loads(res.stdout)["shots"] == 2
    res = run("check", path, "--model", tiny_dir, "--json", "--sampling", "coverage")
    assert res.exit_code == 0, res.output
    verdict = json.loads(res.stdout)
    assert verdict["video"]["duration_s"] == pytest.approx(3000.3, abs=0.05)
    assert verdict["video"]["sampling"] == "coverage" and verdict["video"]["shots"] == 2


def test_check_looks_at_every_video_before_the_model_loads(video_files, tmp_path, monkeypatch):
    """Missing files, folders and non-videos are reported before any model work (the model
    here does not exist: loading it would be exit 2); with no video left, exit 3 at once."""
    loads = []
    monkeypatch.setattr("guardrail.engine.GuardEngine.from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(1)))
    text = tmp_path / "notes.txt"
    text.write_text("not a video\n")
    res = run("check", tmp_path / "nope.mp4", tmp_path, text, "--model", tmp_path / "no-model")
    assert res.exit_code == 3 and not loads, res.output
    lines = res.stderr.strip().splitlines()
    assert lines[0] == f"{tmp_path / 'nope.mp4'}: file not found"
    assert lines[1] == f"{tmp_path}: not a regular file"
    assert lines[2].startswith(f"{text}: ") and len(lines) == 3


def test_check_missing_model_fails_fast(video_files, tmp_path):
    res = run("check", video_files["mp4_h264"], "--model", tmp_path / "nope")
    assert res.exit_code == 2
    assert "make-tiny" in res.stderr and "Traceback" not in res.output


def test_console_script_runs():
    res = subprocess.run([sys.executable, "-m", "guardrail.cli", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and "check" in res.stdout


def _calibration_for(policy: Path, model: Path, tmp_path: Path) -> Path:
    """A Platt calibration of `policy`'s set saved beside it (where `auto` looks)."""
    import numpy as np

    from guardrail.calibration import default_path, fit, save
    from guardrail.policy import load_policy

    ids = [c.id for c in load_policy(policy).categories]
    rng = np.random.default_rng(0)
    raw = rng.uniform(0.3, 0.7, size=(200, len(ids)))
    cal = fit(raw, (rng.uniform(size=raw.shape) < 0.2).astype(int), ids, "platt")
    return save(cal, default_path(policy=policy))


def test_calibration_auto_finds_the_file_beside_the_given_policy(tmp_path, tiny_model,
                                                                  video_files):
    policy = tmp_path / "sw.yaml"
    policy.write_text((ROOT / "policies" / "safewatch.yaml").read_text())
    model, clip = tiny_model(), video_files["mp4_h264"]

    def verdict(*extra):
        got = run("check", clip, "--model", model, "--policy", policy, "--json", *extra)
        assert got.exit_code == 0, got.output
        return Verdict.model_validate_json(got.stdout.splitlines()[0])

    plain = verdict()
    missing = verdict("--calibration", "auto")
    assert not plain.calibrated and not missing.calibrated
    assert any("calibration auto: no calibration file" in w for w in missing.warnings)
    _calibration_for(policy, model, tmp_path)
    calibrated = verdict("--calibration", "auto")
    assert calibrated.calibrated
    assert not any("calibration" in w for w in calibrated.warnings)
    assert calibrated.scores() != plain.scores()


def test_verdicts_name_the_policy_and_warn_about_random_models(tmp_path, tiny_model,
                                                                video_files):
    from guardrail.policy import load_policy
    from guardrail.tiny import TEST_MODEL_KEY, TEST_MODEL_WARNING

    policy = ROOT / "policies" / "weapons.yaml"
    got = run("check", video_files["mp4_h264"], "--model", tiny_model(), "--policy", policy,
              "--json")
    v = Verdict.model_validate_json(got.stdout.splitlines()[0])
    pset = load_policy(policy)
    assert (v.policy_version, v.policy_hash) == (pset.version, pset.content_hash)
    assert v.policy_hash.startswith("sha256:") and len(v.policy_hash) == 71
    assert v.warnings == [TEST_MODEL_WARNING]
    table = run("check", video_files["mp4_h264"], "--model", tiny_model(), "--policy", policy)
    assert "random test model" in " ".join(table.stdout.split())
    assert f"{pset.name} v{pset.version}" in table.stdout and "uncalibrated" in table.stdout
    # the same model without the mark: no warning
    import shutil
    real = shutil.copytree(tiny_model(), tmp_path / "unmarked")
    config = json.loads((real / "config.json").read_text())
    assert config.pop(TEST_MODEL_KEY) is True
    (real / "config.json").write_text(json.dumps(config))
    got = run("check", video_files["mp4_h264"], "--model", real, "--policy", policy, "--json")
    assert Verdict.model_validate_json(got.stdout.splitlines()[0]).warnings == []


def test_policy_hash_follows_content_not_formatting(tmp_path):
    from guardrail.policy import load_policy

    src = (ROOT / "policies" / "weapons.yaml").read_text()
    reformatted = tmp_path / "a.yaml"
    import yaml
    reformatted.write_text("# a comment\n" + yaml.safe_dump(yaml.safe_load(src),
                                                             default_flow_style=True))
    changed = tmp_path / "b.yaml"
    changed.write_text(src.replace("version: 1", "version: 2", 1))
    base = load_policy(ROOT / "policies" / "weapons.yaml").content_hash
    assert load_policy(reformatted).content_hash == base
    assert load_policy(changed).content_hash != base


def test_check_accepts_a_still_image_as_a_one_frame_video(tmp_path, tiny_model, video_files):

    png = tmp_path / "still.png"
    png.write_bytes(videos.encode_png())
    got = run("check", png, video_files["gif"], "--model", tiny_model(), "--json")
    assert got.exit_code == 0, got.output
    still, gif = (Verdict.model_validate_json(line) for line in got.stdout.splitlines())
    assert still.video.frames_used == 1 and still.video.duration_s == 1.0
    assert gif.video.frames_used == 8                         # an animated GIF stays a video


def _in_a_terminal(argv: list[str], cols: int = 100, timeout: float = 300) -> str:
    """Run `argv` with stdout and stderr on a pseudo-terminal; everything it wrote."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, cols, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                            env={**os.environ, "TERM": "xterm", "COLUMNS": str(cols)})
    os.close(slave)
    chunks = []
    while select.select([master], [], [], timeout)[0]:
        try:
            data = os.read(master, 65536)
        except OSError:                       # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=30)
    os.close(master)
    assert proc.returncode == 0
    return b"".join(chunks).decode(errors="replace")


def test_progress_in_a_terminal_never_shares_a_line_with_results(tiny_model, video_files):
    clip = str(video_files["mp4_h264"])
    cli = [sys.executable, "-c", "from guardrail.cli import main; main()"]
    shown = _in_a_terminal([*cli, "check", clip, clip, clip, "--model", str(tiny_model()),
                            "--batch-size", "1", "--mode", "explain", "--max-new-tokens", "4"])
    ansi = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
    starts = [m.start() for m in re.finditer(re.escape(f"{clip}: "), shown)]
    assert len(starts) == 3, shown[-2000:]
    for at in starts:
        line = ansi.sub("", shown[shown.rfind("\n", 0, at) + 1: at])
        assert line.split("\r")[-1].strip() == "", repr(line)       # nothing left of the bar
    assert "explaining 0/1" in shown and "judging" in shown


def test_piped_status_lines_do_not_wrap(tmp_path, tiny_model, video_files):
    clip = tmp_path / ("a-rather-long-directory-name-" * 3) / "clip.mp4"
    clip.parent.mkdir()
    clip.write_bytes(video_files["mp4_h264"].read_bytes())
    got = subprocess.run([sys.executable, "-c", "from guardrail.cli import main; main()",
                          "check", str(clip), "--model", str(tiny_model())], capture_output=True,
                         text=True, env={**os.environ, "COLUMNS": "40"}, timeout=300)
    assert got.returncode == 0, got.stderr
    header = next(line for line in got.stdout.splitlines() if line.startswith(str(clip)))
    assert header.endswith(" ms)") and "frames" in header           # one line, not rewrapped
    assert any(line.startswith("warning: random test model") and line.endswith("meaningless")
               for line in got.stdout.splitlines())


# Commands that need no model must not import torch (3 s of start-up, 27 s on a busy machine).
_NO_TORCH = """
import sys
from guardrail.cli import main
sys.argv = ["guardrail", *sys.argv[1:]]
try:
    main()
except SystemExit as exit:
    code = exit.code or 0
else:
    code = 0
print("torch imported" if "torch" in sys.modules else "no torch", file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.parametrize("args", [
    ["--help"], ["check", "--help"], ["serve", "--help"], ["bench", "--help"],
    ["policy", "validate", "policies/weapons.yaml"], ["policy", "schema"],
    ["policy", "render", "policies/weapons.yaml"], ["policy", "lint", "policies/weapons.yaml"],
    ["policy", "diff", "policies/weapons.yaml", "policies/child_safety.yaml"],
])
def test_commands_without_a_model_do_not_import_torch(args):
    got = subprocess.run([sys.executable, "-c", _NO_TORCH, *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert got.stderr.strip().endswith("no torch"), (got.returncode, got.stderr[-2000:])
    assert got.returncode in (0, 1), got.stderr[-2000:]     # diff exits 1 when sets differ
