"""A normal (non-editable) install works: the built wheel, installed outside the checkout, runs
`guardrail check` with its default policy set and starts `guardrail serve` (review page
included)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Run in the installed copy, from a directory that is not the checkout.
SERVE = textwrap.dedent("""
    import json, sys
    import httpx
    import guardrail
    from guardrail.serve.command import serve
    target, model, video, db = sys.argv[1:5]
    assert guardrail.__file__.startswith(target), guardrail.__file__
    server = serve(model, port=0, backend="local", block=False, jobs_db=db,
                   ready_timeout_s=120)
    try:
        with open(video, "rb") as f:
            r = httpx.post(server.url + "/v1/moderate", files={"file": f}, timeout=120)
        page = httpx.get(server.url + "/review", timeout=30)
        print(json.dumps({"status": r.status_code, "policy_set": r.json().get("policy_set"),
                          "review": [page.status_code, 'id="queue"' in page.text]}))
    finally:
        server.stop()
""")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", str(REPO), "-w", str(out)], check=True, capture_output=True,
                   timeout=300)
    wheel = next(out.glob("guardrail-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "guardrail/policies/safewatch.yaml" in names and "guardrail/deploy/serve.yaml" in names
    assert "guardrail/serve/review.html" in names
    target = out / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, timeout=300)
    return target


def _run(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_installed_wheel_checks_with_the_default_policy(installed, tmp_path, tiny_model,
                                                        video_files):
    got = _run(installed, tmp_path, "-c", "import guardrail, sys; print(guardrail.__file__)")
    assert got.stdout.startswith(str(installed)), got.stdout + got.stderr
    got = _run(installed, tmp_path, "-c", "from guardrail.cli import main; main()", "check",
               str(video_files["mp4_h264"]), "--model", str(tiny_model()), "--json")
    assert got.returncode == 0, got.stderr
    verdict = json.loads(got.stdout.splitlines()[0])
    assert verdict["policy_set"] == "safewatch" and len(verdict["categories"]) == 6


@pytest.mark.slow
def test_installed_wheel_serves(installed, tmp_path, tiny_model, video_files):
    got = _run(installed, tmp_path, "-c", SERVE, str(installed), str(tiny_model()),
               str(video_files["mp4_h264"]), str(tmp_path / "jobs.sqlite"))
    assert got.returncode == 0, got.stderr[-3000:]
    assert json.loads(got.stdout.splitlines()[-1]) == {"status": 200, "policy_set": "safewatch",
                                                       "review": [200, True]}
