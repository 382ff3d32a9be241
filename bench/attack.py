"""A bounded attack run against `guardrail serve` on 127.0.0.1: bad inputs, hostile policy
documents, path / URL / webhook references, auth variants, the review console and a burst.
Prints, per class, how many requests were tried and how many were handled as the contract
says (a 4xx JSON error, or the one expected success); anything else (a 5xx, a non-JSON error, no
answer) is listed.

    .venv/bin/python bench/attack.py --model /tmp/m [--clients 64] [--burst 256]

Loopback only, bounded counts; the server is started in this process (local backend) with an
API key, allow-lists that name one directory and one URL prefix of a file server started here.
"""

from __future__ import annotations

import argparse
import base64
import functools
import random
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

KEY = "attack-run-key"
OK_OR_4XX = frozenset({200, *range(400, 500)})


def clip_bytes() -> bytes:
    import io

    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("h264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(20):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 10, np.uint8), "rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buf.getvalue()


def cases(clip: bytes, origin: str, root: Path) -> dict[str, list[tuple[str, dict, set[int]]]]:
    """class -> [(method path, httpx kwargs, accepted statuses)]."""
    rng = random.Random(0)
    b64 = base64.b64encode(clip).decode()
    bad = []
    for n in (1, 10, 1000, 100_000):
        bad.append(("POST /v1/moderate", {"files": {"file": ("x.mp4", rng.randbytes(n))}}, None))
    for cut in (10, 100, len(clip) // 2, len(clip) - 10):   # a nearly whole file may decode
        bad.append(("POST /v1/moderate", {"files": {"file": ("x.mp4", clip[:cut])}},
                    OK_OR_4XX))
    for body in (b"{", b"[]", b'{"video_base64": 5}', b'{"video_base64": "!!"}', b"\x00" * 64,
                 b'{"video_base64": "' + b64.encode() + b'", "frames": true}',
                 b'{"video_base64": "' + b64.encode() + b'", "frames": 100000}',
                 b'{"video_base64": "' + b64.encode() + b'", "keep_ratio": 0}',
                 b'{"video_base64": "' + b64.encode() + b'", "mode": "evil"}',
                 b'{"video_base64": "' + b64.encode() + b'", "policy_set": "../../etc"}',
                 b'{"video_base64": "' + b64.encode() + b'", "extra": 1}'):
        bad.append(("POST /v1/moderate", {"content": body, "headers": {
            "content-type": "application/json"}}, None))
    bad.append(("POST /v1/moderate", {"content": b"x", "headers": {"content-type": "text/x"}},
                None))
    bad.append(("POST /v1/moderations", {"json": {"input": "text only"}}, None))
    bad.append(("POST /v1/moderations", {"json": {"input": [{"type": "video_url", "video_url": {
        "url": "data:text/plain;base64,aGk="}}]}}, None))
    policies = ["x: 1", "!!python/object:os.system ls", "a: &a [*a]",
                "name: n\nversion: 1\ncategories: []",
                "name: n\nversion: 1\ncategories:\n  - {id: C1, name: A, threshold: 2}",
                "name: n\nversion: 1\nname: m\ncategories:\n  - {id: C1, name: A}",
                "[" * 200, "name: n\nversion: 1\ncategories:\n" + "".join(
                    f"  - {{id: L{i}, name: L, blocked: ['{'word ' * 2000}']}}\n"
                    for i in range(40)),
                "lol: &a [" + ",".join(["x"] * 100) + "]\n" + "".join(
                    f"l{i}: &a{i} [*a, *a, *a, *a, *a, *a, *a, *a]\n" for i in range(1))]
    hostile = [("POST /v1/moderate", {"files": {"file": ("v.mp4", clip)}, "data": {
        "policy": p}}, None) for p in policies]
    refs = [f"{origin}/ok/../secret.mp4", f"{origin}/ok/%2e%2e/secret.mp4",
            f"{origin}/ok%2f..%2fsecret.mp4", f"{origin}/okay/v.mp4", f"{origin}.evil/ok/v.mp4",
            f"{origin}/ok/v.mp4\r\nX: 1", f"{origin}/ok/v.mp4#frag", "http://user@127.0.0.1/",
            f"{root}/ok/v.mp4\x00", f"{root}/secret.mp4", f"file://{root}/ok/../secret.mp4",
            "/etc/passwd", "file:///etc/passwd", "ftp://127.0.0.1/x", "gopher://x", "//x/y"]
    references = [("POST /v1/moderate", {"json": {"video_url": r}}, None) for r in refs]
    references.append(("POST /v1/moderate", {"json": {"video_url": f"{origin}/ok/v.mp4"}},
                       {200}))
    hooks = ["http://127.0.0.1:9/", "http://localhost:9/", "http://2130706433/",
             "http://0x7f.0.0.1/", "http://[::1]/", "http://169.254.169.254/latest/",
             "http://10.0.0.1/", "http://[::ffff:127.0.0.1]/", "http://user@example.com/",
             "file:///tmp/x", "http://exa mple.com/"]
    references += [("POST /v1/jobs", {"files": {"file": ("v.mp4", clip)}, "data": {
        "webhook_url": h}}, None) for h in hooks]
    auth = [({}, 401), ({"authorization": "Bearer"}, 401),
            ({"authorization": f"Basic {KEY}"}, 401), ({"authorization": f"Bearer {KEY}x"}, 401),
            ({"authorization": f"Bearer {KEY[:-1]}"}, 401),
            ({"authorization": "Bearer " + "k" * 4000}, 401),
            ({"authorization": f"bearer {KEY}"}, 200), ({"authorization": f"Bearer  {KEY}"}, 200)]
    auths = [("GET /v1/policies", {"headers": h, "raw_auth": True}, {code}) for h, code in auth]
    return {"bad inputs": bad, "hostile policies": hostile, "references": references,
            "auth variants": auths}


def review_cases(item: str) -> list[tuple[str, dict, set[int] | None]]:
    """The review console's API and sign-in, against a real item `item`."""
    out: list[tuple[str, dict, set[int] | None]] = []
    for query in ({"cursor": "nope"}, {"cursor": "W1e999999, \"x\"]"}, {"cursor": "A" * 600},
                  {"cursor": base64.urlsafe_b64encode(b"[1" + b"0" * 400 + b', "x"]').decode()},
                  {"limit": 0}, {"limit": 10**9},
                  {"status": "maybe"}, {"flagged": "perhaps"}, {"category": "C1' OR 1=1 --"},
                  {"category": "%"}, {"category": "C1,C2"}, {"policy_set": "x" * 500}):
        out.append(("GET /v1/reviews", {"params": query}, None))
    for path in ("/v1/reviews/rev-nope", f"/v1/reviews/{item}/frames/-1",
                 f"/v1/reviews/{item}/frames/{10**20}", f"/v1/reviews/{item}/frames/x",
                 "/v1/reviews/%2e%2e%2fjobs", f"/v1/reviews/{item}%00"):
        out.append((f"GET {path}", {}, None))
    for body in ({"labels": ["C99"]}, {"labels": "C1"}, {"labels": [1]}, {"labels": []},
                 {"labels": [], "note": "n" * 5000}, {"labels": [], "extra": 1},
                 {"labels": ["C1"] * 300}):
        out.append((f"POST /v1/reviews/{item}", {"json": body},
                    {200} if body == {"labels": []} else None))
    out.append((f"POST /v1/reviews/{item}", {"content": b"labels=C1", "headers": {
        "content-type": "application/x-www-form-urlencoded"}}, None))
    out.append((f"POST /v1/reviews/{item}", {"content": b"{", "headers": {
        "content-type": "application/json"}}, None))
    out.append(("POST /review/login", {"data": {"key": KEY}, "headers": {
        "sec-fetch-site": "cross-site"}}, None))
    out.append(("POST /review/login", {"data": {"key": KEY}, "headers": {
        "origin": "http://evil.example"}}, None))
    out.append(("POST /review/logout", {"headers": {"sec-fetch-site": "cross-site"}}, None))
    out.append(("GET /review", {"raw_auth": True}, {401}))
    out.append(("GET /v1/reviews/export", {"raw_auth": True}, None))
    return out


def send(client: httpx.Client, method_path: str, kw: dict, accepted: set[int] | None
         ) -> str | None:
    """None when handled as the contract says, else what went wrong."""
    method, path = method_path.split(" ", 1)
    kw = dict(kw)
    headers = kw.pop("headers", {})
    if not kw.pop("raw_auth", False):
        headers = {"authorization": f"Bearer {KEY}", **headers}
    try:
        reply = client.request(method, path, headers=headers, timeout=120, **kw)
    except httpx.HTTPError as err:
        return f"no answer ({type(err).__name__})"
    if accepted is not None:
        return None if reply.status_code in accepted else f"HTTP {reply.status_code}"
    if not 400 <= reply.status_code < 500:
        return f"HTTP {reply.status_code}"
    try:
        error = reply.json()["error"]
        assert set(error) == {"type", "message"}
    except Exception:
        return f"HTTP {reply.status_code} without the JSON error body"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--burst", type=int, default=256, help="requests in the load burst")
    args = ap.parse_args(argv)

    from guardrail.serve.command import serve

    root = Path(tempfile.mkdtemp(prefix="attack-"))
    clip = clip_bytes()
    (root / "ok").mkdir()
    (root / "ok" / "v.mp4").write_bytes(clip)
    (root / "secret.mp4").write_bytes(clip)
    files = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(
        SimpleHTTPRequestHandler, directory=str(root)))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{files.server_address[1]}"
    config = root / "serve.yaml"
    config.write_text(f"""
applications:
  - name: guardrail
    import_path: guardrail.serve.deployment:build_app
    args:
      frames: 2
      api_keys: [{KEY}]
      allow_paths: [{root / 'ok'}]
      allow_urls: [{origin}/ok]
      load: {{max_inflight: 8, retry_after_s: 1}}
      jobs: {{db_path: {root / 'jobs.sqlite'}, workers: 0}}
      review: {{record: all}}
""")
    server = serve(args.model, config=str(config), port=0, backend="local", block=False,
                   ready_timeout_s=300)
    rows, problems = [], []
    try:
        with httpx.Client(base_url=server.url) as client:
            for name, tries in cases(clip, origin, root).items():
                bad = [(f"{mp} #{i}", why) for i, (mp, kw, ok) in enumerate(tries)
                       if (why := send(client, mp, kw, ok)) is not None]
                rows.append((name, len(tries), len(tries) - len(bad)))
                problems += [f"{name}: {mp}: {why}" for mp, why in bad]
            items = client.get("/v1/reviews", params={"limit": 1},
                               headers={"authorization": f"Bearer {KEY}"}).json()["items"]
            tries = review_cases(items[0]["id"] if items else "rev-none")
            bad = [(f"{mp} #{i}", why) for i, (mp, kw, ok) in enumerate(tries)
                   if (why := send(client, mp, kw, ok)) is not None]
            rows.append(("review console", len(tries), len(tries) - len(bad)))
            problems += [f"review console: {mp}: {why}" for mp, why in bad]
            if not items:
                problems.append("review console: no item was kept to attack")

            def one(_):
                r = client.post("/v1/moderate", files={"file": ("v.mp4", clip)},
                                headers={"authorization": f"Bearer {KEY}"}, timeout=300)
                ok = r.status_code == 200 or (r.status_code == 429 and "retry-after" in r.headers)
                return ok, r.status_code

            with ThreadPoolExecutor(args.clients) as pool:
                burst = list(pool.map(one, range(args.burst)))
            rows.append((f"load ({args.clients} clients)", len(burst), sum(ok for ok, _ in burst)))
            problems += [f"load: HTTP {code}" for ok, code in burst if not ok]
            alive = client.get("/healthz").status_code == 200
    finally:
        server.stop()
        files.shutdown()
    codes = sorted({code for _, code in burst})
    print("| class | tried | handled | not handled |\n|---|---:|---:|---:|")
    for name, tried, handled in rows:
        print(f"| {name} | {tried} | {handled} | {tried - handled} |")
    print(f"\nload statuses: {codes}; service healthy afterwards: {alive}")
    for p in problems:
        print("NOT HANDLED", p)
    return 1 if problems or not alive else 0


if __name__ == "__main__":
    raise SystemExit(main())
