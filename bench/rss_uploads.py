"""Memory of the HTTP service under large uploads: the server's resident set size (RSS) before,
at its peak during, and after large request bodies, per kind of body.

    .venv/bin/python bench/rss_uploads.py --model /tmp/m [--mb 200] [--repeats 3]

Starts `guardrail serve` (local backend, 127.0.0.1, a free port) in a child process with
`limits.max_upload_bytes` above the body size, then sends, one kind at a time, `--repeats`
bodies of `--mb` MB of random bytes (not a video: the service reads all of it, then refuses
it with 415/422): a multipart upload, a JSON body with base64, and a multipart upload to
/v1/jobs. RSS is read from /proc/<pid>/status every 20 ms. Prints a table: baseline after a
warm-up request, peak, and RSS 2 s after the last body of each kind.
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

SERVER = """
import sys
from guardrail.serve.command import serve
serve(sys.argv[1], config=sys.argv[2], port=int(sys.argv[3]), backend="local",
      ready_timeout_s=300)
"""


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Sampler:
    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.02)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--mb", type=int, default=200, help="body size in MB")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    size = args.mb << 20
    tmp = Path(tempfile.mkdtemp(prefix="rss-"))
    config = yaml.safe_load((Path(__file__).parents[1] / "deploy" / "serve.yaml").read_text())
    app = config["applications"][0]["args"]
    app["limits"]["max_upload_bytes"] = size + (1 << 20)
    app["jobs"]["db_path"] = str(tmp / "jobs.sqlite")
    app["jobs"]["workers"] = 0
    (tmp / "serve.yaml").write_text(yaml.safe_dump(config))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", SERVER, args.model, str(tmp / "serve.yaml"),
                             str(port)], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        junk = os.urandom(size)
        b64 = b'{"video_base64": "' + base64.b64encode(junk) + b'"}'
        kinds = {
            "multipart /v1/moderate": lambda: httpx.post(
                f"{url}/v1/moderate", files={"file": ("x.mp4", junk, "video/mp4")}, timeout=600),
            "JSON base64 /v1/moderate": lambda: httpx.post(
                f"{url}/v1/moderate", content=b64, timeout=600,
                headers={"content-type": "application/json"}),
            "multipart /v1/jobs": lambda: httpx.post(
                f"{url}/v1/jobs", files={"file": ("x.mp4", junk, "video/mp4")}, timeout=600),
        }
        httpx.post(f"{url}/v1/moderate", files={"file": ("x.mp4", b"x" * 1000, "video/mp4")})
        time.sleep(1.0)
        rows = []
        for name, send in kinds.items():
            base = rss_mb(proc.pid)
            statuses = []
            with Sampler(proc.pid) as sampler:
                for _ in range(args.repeats):
                    statuses.append(send().status_code)
            time.sleep(2.0)
            rows.append((name, base, sampler.peak, rss_mb(proc.pid), statuses))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print(f"{args.repeats} bodies of {args.mb} MB each, one kind at a time; server RSS in MB")
    print("| body | baseline | peak | 2 s after | peak - baseline | after - baseline | statuses |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, base, peak, after, statuses in rows:
        print(f"| {name} | {base:,.0f} | {peak:,.0f} | {after:,.0f} | {peak - base:+,.0f} "
              f"| {after - base:+,.0f} | {', '.join(map(str, statuses))} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
