"""Load test of the moderation service on loopback: latency, throughput and 429s under overload.

    python bench/load.py                           # tiny model, local Ray, default bounds
    python bench/load.py --backend local           # the same app without Ray
    python bench/load.py --url http://127.0.0.1:8000 --api-key K   # a service already running

Two phases: `steady` (2 clients) and `overload` (--concurrency clients, far more than the model
deployment takes in flight plus its queue). Each request uploads a small generated video to
POST /v1/moderate. Loopback only; bounded by --requests and --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from fractions import Fraction
from urllib.parse import urlsplit

import av
import httpx
import numpy as np

MAX_REQUESTS = 2000
MAX_SECONDS = 600.0


@dataclass
class PhaseResult:
    phase: str
    concurrency: int
    sent: int
    ok: int
    rejected_429: int
    other: int
    p50_ms: float
    p99_ms: float
    ok_per_s: float
    share_429: float


def make_video(seconds: float = 3.0, fps: int = 10, size: tuple[int, int] = (128, 96)) -> bytes:
    """A small h264 mp4 of random frames (seeded: the same bytes every run)."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=Fraction(fps), options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for _ in range(int(seconds * fps)):
            frame = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    return buf.getvalue()


async def run_phase(url: str, video: bytes, name: str, concurrency: int, n: int,
                    deadline: float, headers: dict[str, str]) -> PhaseResult:
    gate = asyncio.Semaphore(concurrency)
    results: list[tuple[int, float]] = []

    async def one(client: httpx.AsyncClient) -> None:
        async with gate:
            if time.monotonic() > deadline:
                return
            t0 = time.perf_counter()
            try:
                reply = await client.post(f"{url}/v1/moderate", headers=headers,
                                          files={"file": ("v.mp4", video, "video/mp4")})
                status = reply.status_code
            except httpx.HTTPError:
                status = 0
            results.append((status, (time.perf_counter() - t0) * 1e3))

    limits = httpx.Limits(max_connections=concurrency + 4)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        await asyncio.gather(*(one(client) for _ in range(n)))
    wall = time.perf_counter() - t0
    ok = sorted(ms for status, ms in results if status == 200)
    n429 = sum(1 for status, _ in results if status == 429)
    return PhaseResult(name, concurrency, len(results), len(ok), n429,
                       len(results) - len(ok) - n429, _pct(ok, 50), _pct(ok, 99),
                       len(ok) / wall if wall else 0.0, n429 / max(1, len(results)))


def _pct(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def table(rows: list[PhaseResult]) -> str:
    head = ("| phase | clients | sent | 200 | 429 | other | p50 ms | p99 ms | ok/s | 429 share |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {r.phase} | {r.concurrency} | {r.sent} | {r.ok} | {r.rejected_429} | {r.other} "
             f"| {r.p50_ms:.0f} | {r.p99_ms:.0f} | {r.ok_per_s:.2f} | {r.share_429:.0%} |"
             for r in rows]
    return "\n".join([head, *lines])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", help="a running service on loopback (default: start one)")
    p.add_argument("--model", help="model dir (default: a tiny random qwen2_5_vl)")
    p.add_argument("--backend", choices=["ray", "local"], default="ray")
    p.add_argument("--config", help="Serve config (default deploy/serve.yaml)")
    p.add_argument("--api-key", default=os.environ.get("GUARDRAIL_API_KEY"))
    p.add_argument("--requests", type=int, default=200, help="overload phase requests")
    p.add_argument("--concurrency", type=int, default=64, help="overload phase clients")
    p.add_argument("--max-seconds", type=float, default=180.0, help="bound on the whole run")
    p.add_argument("--json", action="store_true", help="print JSON rows, not a table")
    args = p.parse_args(argv)
    if not 1 <= args.requests <= MAX_REQUESTS or not 0 < args.max_seconds <= MAX_SECONDS:
        p.error(f"--requests must be 1..{MAX_REQUESTS} and --max-seconds at most {MAX_SECONDS}")
    if args.url and urlsplit(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        p.error("--url must be on loopback (127.0.0.1, localhost, ::1)")

    with tempfile.TemporaryDirectory() as tmp:
        server = None
        url = args.url
        if url is None:
            server = start(args, tmp)
            url = server.url
        try:
            rows = asyncio.run(measure(url, args))
        finally:
            if server is not None:
                server.stop()
    if args.json:
        for r in rows:
            print(json.dumps(asdict(r)))
    else:
        print(table(rows))
    return 0


def start(args: argparse.Namespace, tmp: str):
    from guardrail.serve.command import serve
    from guardrail.tiny import make_tiny

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = args.model or str(make_tiny(os.path.join(tmp, "tiny"), "qwen2_5_vl"))
    port = _free_port()
    print(f"starting the service ({args.backend}) on 127.0.0.1:{port} ...", file=sys.stderr)
    return serve(model, args.config, "127.0.0.1", port, backend=args.backend, block=False,
                 jobs_db=os.path.join(tmp, "jobs.sqlite"), ready_timeout_s=300)


async def measure(url: str, args: argparse.Namespace) -> list[PhaseResult]:
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    deadline = time.monotonic() + args.max_seconds
    video = make_video()
    await run_phase(url, video, "warmup", 1, 2, deadline, headers)
    steady = await run_phase(url, video, "steady", 2, max(4, args.requests // 5), deadline,
                             headers)
    overload = await run_phase(url, video, "overload", args.concurrency, args.requests,
                               deadline, headers)
    return [steady, overload]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
