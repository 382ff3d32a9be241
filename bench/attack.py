"""A bounded attack run against `guardrail serve` on 127.0.0.1: bad inputs, hostile policy
documents, path / URL / webhook references, auth variants, the review console and a burst.
Prints, per class, how many requests were tried and how many were handled as the contract
says (a 4xx JSON error, or the one expected success); anything else (a 5xx, a non-JSON error, no
answer) is listed.

    .venv/bin/python bench/attack.py --model /tmp/m [--clients 64] [--burst 256]

Loopback only, bounded counts; the server is started in this process (local backend) with an
API key, allow-lists that name one directory and one URL prefix of a file server started here.
Then the service-hardening classes run on a second server (two API keys and an admin key,
uniform sampling, `load.max_inflight` 12 with 8 per key, `load.decode_memory_bytes` 320 MiB, a
SQLite store): inline policies over the prompt-token budget, large frames against the
decoded-frame budgets (with the process's RSS), bodies dripped a byte a second, frames thinner
than 1:200, the store taken away and brought back, look-alike category names, small routes
with huge bodies and out-of-range versions. The whole run: about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import random
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import yaml

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


# --- the service-hardening classes (their own server: two keys, uniform sampling, a small
# decode budget, a SQLite store the run takes away) ---------------------------------------------

KEY_B = "attack-run-key-b"
ADMIN = "attack-run-admin"
DECODE_BUDGET = 320 << 20    # load.decode_memory_bytes: 64 frames at 1440x1440 are over it
PER_KEY = 8                  # load.max_inflight_per_key (max_inflight 12: room for key A)


def encode(width: int, height: int, count: int, codec: str = "h264", fmt: str = "mp4") -> bytes:
    """A few flat frames (small in bytes whatever their size): H.264 or PNG frames."""
    import io

    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=8)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p" if codec == "h264" else "rgb24"
        if codec == "h264":
            stream.options = {"preset": "ultrafast"}
        for i in range(count):
            frame = np.full((height, width, 3), i * 10 % 256, np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, "rgb24")))
        out.mux(stream.encode(None))
    return buf.getvalue()


def png(width: int, height: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 20, 20)).save(buf, "PNG")
    return buf.getvalue()


def rss_mb() -> float:
    """This process's resident memory (the server runs in it), MB."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


@dataclass
class Target:
    """The hardening server and what one class found: tries (label, None or what went wrong)
    and notes for the results file."""

    client: httpx.Client
    port: int
    root: Path
    clip: bytes
    tries: list[tuple[str, str | None]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def call(self, method_path: str, statuses: set[int], kind: set[str] | None = None,
             key: str = KEY, client: httpx.Client | None = None, label: str = "", **kw
             ) -> tuple[httpx.Response | None, float]:
        """One request, checked: status in `statuses`, a 4xx/5xx with the JSON error body
        (of a type in `kind` when given), 429/503 with Retry-After. Recorded as a try."""
        method, path = method_path.split(" ", 1)
        headers = {"authorization": f"Bearer {key}", **kw.pop("headers", {})}
        t0 = time.perf_counter()
        try:
            reply = (client or self.client).request(method, path, headers=headers,
                                                    timeout=120, **kw)
        except httpx.HTTPError as err:
            self.tries.append((label or method_path, f"no answer ({type(err).__name__})"))
            return None, time.perf_counter() - t0
        took = time.perf_counter() - t0
        self.tries.append((label or method_path, _judged(reply, statuses, kind)))
        return reply, took

    def expect(self, label: str, ok: bool, why: str) -> None:
        self.tries.append((label, None if ok else why))


def _judged(reply: httpx.Response, statuses: set[int], kind: set[str] | None) -> str | None:
    code, text = reply.status_code, reply.text[:300]
    if code not in statuses:
        return f"HTTP {code}: {text}"
    if code >= 400:
        try:
            error = reply.json()["error"]
            assert set(error) == {"type", "message"}
        except Exception:
            return f"HTTP {code} without the JSON error body: {text}"
        if kind is not None and error["type"] not in kind:
            return f"HTTP {code} {error['type']}, expected {sorted(kind)}: {text}"
    if code in (429, 503) and "retry-after" not in reply.headers:
        return f"HTTP {code} without Retry-After"
    return None


def raw(port: int, head: str, first: bytes = b"", drip: bool = False, limit_s: float = 15.0
        ) -> tuple[int | None, str, float]:
    """A hand-made request on a socket: `head` (request line and headers), then `first`, then
    (`drip`) one more body byte a second, until a whole reply comes back, the server hangs up
    or `limit_s` passes. Returns (status or None, body, seconds)."""
    t0 = time.monotonic()
    data, next_byte = b"", t0 + 1.0
    with socket.create_connection(("127.0.0.1", port), timeout=limit_s) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + first)
        while time.monotonic() - t0 < limit_s and not _whole(data):
            sock.settimeout(max(0.05, min(next_byte - time.monotonic(), 1.0)))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                chunk = None
            except OSError:
                break
            if chunk == b"":
                break
            data += chunk or b""
            if drip and not chunk and time.monotonic() >= next_byte:
                with suppress(OSError):
                    sock.sendall(b"A")
                next_byte += 1.0
    took = time.monotonic() - t0
    if not data.startswith(b"HTTP/"):
        return None, data[:200].decode("latin-1"), took
    return int(data.split(b" ", 2)[1]), data.partition(b"\r\n\r\n")[2].decode("latin-1"), took


def _whole(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    length = next((int(v) for k, _, v in (h.partition(b":") for h in head.split(b"\r\n"))
                   if k.strip().lower() == b"content-length"), 0)
    return len(body) >= length


def long_policy(categories: int, rules: int) -> str:
    cats = "".join(f"  - id: C{i}\n    name: Category {i}\n    blocked:\n" + "".join(
        f"      - Rule {j} of category {i}, people showing harmful behaviour in public places.\n"
        for j in range(rules)) for i in range(categories))
    return f"name: longpol\nversion: 1\ncategories:\n{cats}"


def prompt_budget(t: Target) -> None:
    """Inline policies over limits.max_prompt_tokens: 413 prompt_too_long at once, and another
    client's plain request right after it is judged at once."""
    b64 = base64.b64encode(t.clip).decode()
    with httpx.Client(base_url=str(t.client.base_url)) as other:
        for cats, rules in ((60, 10), (64, 16)):          # ~52 KB (~18 K tokens), ~87 KB
            text = long_policy(cats, rules)
            if rules == 10:
                reply, took = t.call("POST /v1/moderate", {413}, {"prompt_too_long"}, key=KEY_B,
                                     files={"file": ("v.mp4", t.clip)}, data={"policy": text})
            else:
                reply, took = t.call("POST /v1/moderations", {413}, {"prompt_too_long"},
                                     key=KEY_B, json={"input": [{"type": "video_url",
                                     "video_url": {"url": f"data:video/mp4;base64,{b64}"}}],
                                     "policy": text})
            t.expect("long policy answered within 5 s", took < 5, f"took {took:.1f} s")
            _, after = t.call("POST /v1/moderate", {200}, client=other,
                              files={"file": ("v.mp4", t.clip)})
            t.expect("next request judged within 5 s", after < 5, f"took {after:.1f} s")
            t.notes.append(f"{len(text) >> 10} KB policy: HTTP "
                           f"{reply.status_code if reply else '-'} in {took:.2f} s; "
                           f"the next client's request: {after:.2f} s")


def large_frames(t: Target) -> None:
    """Frames of 2048x2048 and 4096x4096 (scaled to 1440x1440 while decoding, 5.9 MiB each),
    `frames` 16/32/64: 200, or 413/429 from the decode budgets; never 5xx. RSS sampled."""
    clips = {"2048x2048 x64": encode(2048, 2048, 64), "4096x4096 x16": encode(4096, 4096, 16)}
    peak, stop = [rss_mb()], threading.Event()
    base = peak[0]

    def sample() -> None:
        while not stop.wait(0.02):
            peak.append(max(peak[-1], rss_mb()))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    statuses = []

    def one(name: str, frames: int) -> tuple[str, int | None, float]:
        reply, took = t.call("POST /v1/moderate", {200, 413, 429},
                             {"video_too_large", "overloaded"}, files={
                                 "file": ("big.mp4", clips[name], "video/mp4")},
                             data={"frames": str(frames)})
        return f"{name} frames={frames}", reply.status_code if reply else None, took

    try:
        for name in clips:
            for frames in (16, 32, 64):
                statuses.append(one(name, frames))
        with ThreadPoolExecutor(3) as pool:          # 3 x 190 MiB at once: over the budget
            statuses += list(pool.map(lambda _: one("2048x2048 x64", 32), range(3)))
    finally:
        stop.set()
        sampler.join()
    time.sleep(2)
    sizes = ", ".join(f"{k} {len(v) >> 10} KB" for k, v in clips.items())
    t.notes.append(f"clips: {sizes}; " + "; ".join(
        f"{label}: {code} ({took:.1f} s)" for label, code, took in statuses))
    t.notes.append(f"server RSS: {base:.0f} MB before, peak {max(peak):.0f} MB "
                   f"(+{max(peak) - base:.0f}), {rss_mb():.0f} MB 2 s after")
    t.expect("decoded-frame budget refused something (413/429)",
             any(code in (413, 429) for _, code, _ in statuses), "no 413/429 seen")


def drip_fed(t: Target, count: int = 10) -> None:
    """`count` bodies from key B dripped a byte a second: 408 request_timeout within 10 s (or
    429 at once past key B's share of slots); key A is judged meanwhile."""
    results: list[tuple[int | None, str, float]] = []
    heads = [("POST /v1/moderate HTTP/1.1\nhost: x\nauthorization: Bearer {k}\n"
              "content-type: application/json\ncontent-length: 1000000\n"),
             ("POST /v1/jobs HTTP/1.1\nhost: x\nauthorization: Bearer {k}\ncontent-type: "
              "multipart/form-data; boundary=b\ncontent-length: 1000000\n")]

    def drip(i: int) -> None:
        head = heads[i % 2].format(k=KEY_B)
        results.append(raw(t.port, head, b'{"video_base64": "' if i % 2 == 0 else b"--b\r\n",
                           drip=True, limit_s=20))

    threads = [threading.Thread(target=drip, args=(i,)) for i in range(count)]
    for th in threads:
        th.start()
    time.sleep(0.5)
    during = []
    while any(th.is_alive() for th in threads) and len(during) < 12:
        reply, took = t.call("POST /v1/moderate", {200}, files={"file": ("v.mp4", t.clip)})
        during.append(f"{reply.status_code if reply else '-'} ({took:.1f} s)")
        time.sleep(0.5)
    for th in threads:
        th.join()
    for code, body, took in results:
        ok = (code == 408 and "request_timeout" in body and took <= 10) or (
            code == 429 and took <= 2)
        t.expect("drip-fed body", ok, f"HTTP {code} after {took:.1f} s: {body[:200]}")
    held = sum(code == 408 for code, _, _ in results)
    t.expect(f"key B held at most {PER_KEY} slots", held <= PER_KEY, f"{held} were admitted")
    t.call("POST /v1/moderate", {200}, key=KEY_B, files={"file": ("v.mp4", t.clip)})
    t.notes.append(f"{count} drip sockets (key B): " + ", ".join(
        f"{code} at {took:.1f} s" for code, _, took in sorted(results, key=lambda r: r[2]))
        + f"; key A meanwhile: {', '.join(during)}")


def thin_frames(t: Target) -> None:
    """Frames thinner than 1:200: 422 invalid_video (or 413), never a 500; a PNG sent as a
    video may also be 415 (not a video)."""
    bad = {"video_too_large", "invalid_video"}
    for w, h in ((1, 4000), (4000, 1), (3, 3000)):
        t.call("POST /v1/moderate", {413, 422}, bad,
               files={"file": ("thin.png", png(w, h), "image/png")})
        t.call("POST /v1/moderate", {413, 415, 422}, {*bad, "unsupported_media"},
               files={"file": ("thin.mp4", png(w, h), "video/mp4")})
        t.call("POST /v1/moderate", {413, 422}, bad,
               files={"file": ("thin.mov", encode(w, h, 2, "png", "mov"), "video/quicktime")})
        url = "data:image/png;base64," + base64.b64encode(png(w, h)).decode()
        t.call("POST /v1/moderations", {413, 422}, bad, json={"input": [
            {"type": "image_url", "image_url": {"url": url}}]})
    for w, h in ((4096, 16), (16, 4096)):
        t.call("POST /v1/moderate", {413, 422}, bad,
               files={"file": ("thin.mp4", encode(w, h, 4), "video/mp4")})


def store_faults(t: Target, db: Path) -> None:
    """The SQLite file replaced by a directory: 503 store_unavailable with Retry-After on every
    route that needs the store, /healthz 503 degraded, /livez 200, synchronous moderation 200;
    all 200 again once it is back."""
    upload = {"files": {"file": ("v.mp4", t.clip)}}
    reply, _ = t.call("POST /v1/jobs", {202}, **upload)
    job = reply.json()["id"] if reply is not None and reply.status_code == 202 else "job-none"
    needs = [("POST /v1/jobs", upload), (f"GET /v1/jobs/{job}", {}), ("GET /v1/reviews", {}),
             ("GET /v1/policies/safewatch/versions", {})]
    aside = db.with_name(db.name + ".aside")
    db.rename(aside)
    while True:                               # a directory where the file was
        try:
            db.mkdir()
            break
        except FileExistsError:               # NOTE: a poll's connect made an empty file
            db.unlink()
    try:
        for method_path, kw in needs:
            t.call(method_path, {503}, {"store_unavailable"}, **kw)
        health = t.client.get("/healthz")
        t.expect("GET /healthz", health.status_code == 503 and "retry-after" in health.headers
                 and health.json().get("status") == "degraded"
                 and health.json().get("store") == "unavailable",
                 f"HTTP {health.status_code}: {health.text[:200]}")
        t.call("GET /livez", {200})
        t.call("POST /v1/moderate", {200}, **upload)
    finally:
        db.rmdir()
        aside.rename(db)
    t0 = time.monotonic()
    while t.client.get("/healthz").status_code != 200 and time.monotonic() - t0 < 20:
        time.sleep(0.25)
    back = time.monotonic() - t0
    t.call("GET /healthz", {200})
    for method_path, kw in needs:
        t.call(method_path, {202 if method_path == "POST /v1/jobs" else 200}, **kw)
    t.call("POST /v1/moderate", {200}, **upload)
    t.notes.append(f"/healthz 200 again {back:.1f} s after the file came back")


def look_alike_names(t: Target) -> None:
    """Two categories whose names are the same once case- and NFKC-folded, or a name with
    zero-width / direction characters: 422, inline and as a registered set."""
    b64 = base64.b64encode(t.clip).decode()
    pairs = [("Weapons", "weapons"), ("Weapons", "Weap\u200bons"), ("Weapons", "WEAPONS"),
             ("Weapons", "\uff37eapons"), ("Knives", "\u212anives"), ("Straße", "STRASSE"),
             ("Weap\u202eons", "Drugs"), ("Weapons", "Weapons\u00a0"), ("Weapons", "Weapons ")]
    for a, b in pairs:
        text = (f"name: lookalike\nversion: 1\ncategories:\n  - {{id: C1, name: {json.dumps(a)}"
                f", blocked: [x]}}\n  - {{id: C2, name: {json.dumps(b)}, blocked: [y]}}\n")
        names = f"names {a!r} and {b!r}"
        close = {"connection": "close"}     # NOTE: a 500 closes its connection; keep tries apart
        t.call("POST /v1/moderate", {422}, label=f"POST /v1/moderate, {names}", headers=close,
               files={"file": ("v.mp4", t.clip)}, data={"policy": text})
        t.call("POST /v1/moderations", {422}, label=f"POST /v1/moderations, {names}",
               headers=close, json={"input": [{"type": "video_url", "video_url": {
                   "url": f"data:video/mp4;base64,{b64}"}}], "policy": text})
        t.call("PUT /v1/policies/lookalike", {422}, key=ADMIN, content=text.encode(),
               label=f"PUT /v1/policies/lookalike, {names}",
               headers={"content-type": "application/yaml", **close})


def small_routes(t: Target, item: str) -> None:
    """Small routes with a 300 MB Content-Length (headers and a few bytes sent): 413 at once;
    a chunked body past 4 KB: 413; versions past 2^31-1: 4xx."""
    huge = 300 << 20
    for route, ctype in (("POST /review/login", "application/x-www-form-urlencoded"),
                         ("POST /review/logout", "application/x-www-form-urlencoded"),
                         (f"POST /v1/reviews/{item}", "application/json"),
                         ("PUT /v1/policies/big", "application/yaml")):
        head = (f"{route} HTTP/1.1\nhost: x\nauthorization: Bearer {ADMIN}\ncontent-type: "
                f"{ctype}\ncontent-length: {huge}\n")
        code, body, took = raw(t.port, head, b"key=abc", limit_s=10)
        t.expect(f"{route} with Content-Length {huge}", code == 413 and took < 2,
                 f"HTTP {code} after {took:.1f} s: {body[:200]}")
        t.notes.append(f"{route}, Content-Length {huge}: {code} in {took * 1e3:.0f} ms")
    chunk = b"2000\r\n" + b"k" * 0x2000 + b"\r\n"
    code, body, took = raw(t.port, "POST /review/login HTTP/1.1\nhost: x\ncontent-type: "
                           "application/x-www-form-urlencoded\ntransfer-encoding: chunked\n"
                           "sec-fetch-site: same-origin\n",
                           chunk * 8 + b"0\r\n\r\n", limit_s=10)
    t.expect("chunked 64 KB sign-in", code == 413, f"HTTP {code} after {took:.1f} s: {body}")
    b64 = base64.b64encode(t.clip).decode()
    for v in ("2147483648", "9223372036854775808", "1" + "0" * 400, "-1", "0"):
        t.call("POST /v1/moderate", set(range(400, 500)), content=(
            f'{{"video_base64": "{b64}", "policy_set": "safewatch", "policy_version": {v}}}'
        ).encode(), headers={"content-type": "application/json"})
        t.call("POST /v1/moderate", set(range(400, 500)), files={"file": ("v.mp4", t.clip)},
               data={"policy_set": "safewatch", "policy_version": v})
        t.call("POST /v1/moderations", set(range(400, 500)), content=(
            f'{{"input": [{{"type": "video_url", "video_url": {{"url": "data:video/mp4;base64,'
            f'{b64}"}}}}], "policy_set": "safewatch", "policy_version": {v}}}').encode(),
               headers={"content-type": "application/json"})
        t.call("PUT /v1/policies/weapons", set(range(400, 500)), key=ADMIN, content=(
            Path(__file__).parents[1] / "policies" / "weapons.yaml").read_text().replace(
                "version: 1", f"version: {v}").encode())


def _serve(model: str, config: Path, args: dict):
    """`guardrail serve` (local backend, in this process) with these service settings."""
    from guardrail.serve.command import serve

    config.write_text(yaml.safe_dump({"applications": [{
        "name": "guardrail", "import_path": "guardrail.serve.deployment:build_app",
        "args": args}]}))
    return serve(model, config=str(config), port=0, backend="local", block=False,
                 ready_timeout_s=300)


def hardening(model: str, root: Path, clip: bytes
              ) -> tuple[list[tuple[str, int, int]], list[str], list[str]]:
    """Runs the hardening classes on their own server; (rows, problems, notes)."""
    db = root / "hardening.sqlite"
    server = _serve(model, root / "hardening.yaml", {
        "frames": 2, "sampling": {"mode": "uniform"}, "api_keys": [KEY, KEY_B],
        "admin_keys": [ADMIN],
        "load": {"max_inflight": 12, "max_inflight_per_key": PER_KEY, "retry_after_s": 1,
                 "decode_memory_bytes": DECODE_BUDGET},
        "jobs": {"db_path": str(db), "workers": 0}, "review": {"record": "all"}})
    rows, problems, notes = [], [], []
    try:
        with httpx.Client(base_url=server.url) as client:
            warm = Target(client, urlsplit(server.url).port, root, clip)
            warm.call("POST /v1/moderate", {200}, files={"file": ("v.mp4", clip)})
            items = client.get("/v1/reviews", params={"limit": 1}, headers={
                "authorization": f"Bearer {KEY}"}).json()["items"]
            item = items[0]["id"] if items else "rev-none"
            for name, run in (("prompt budget", prompt_budget), ("large frames", large_frames),
                              ("drip-fed bodies", drip_fed), ("thin frames", thin_frames),
                              ("store faults", functools.partial(store_faults, db=db)),
                              ("look-alike names", look_alike_names),
                              ("small routes, versions", functools.partial(
                                  small_routes, item=item))):
                t = Target(client, warm.port, root, clip)
                t0 = time.perf_counter()
                run(t)
                bad = [f"{name}: {label}: {why}" for label, why in t.tries if why is not None]
                rows.append((name, len(t.tries), len(t.tries) - len(bad)))
                problems += bad
                notes += [f"{name} ({time.perf_counter() - t0:.0f} s): {n}" for n in t.notes]
    finally:
        server.stop()
    return rows, problems, notes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--burst", type=int, default=256, help="requests in the load burst")
    args = ap.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="attack-"))
    clip = clip_bytes()
    (root / "ok").mkdir()
    (root / "ok" / "v.mp4").write_bytes(clip)
    (root / "secret.mp4").write_bytes(clip)
    files = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(
        SimpleHTTPRequestHandler, directory=str(root)))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{files.server_address[1]}"
    server = _serve(args.model, root / "serve.yaml", {
        "frames": 2, "api_keys": [KEY], "allow_paths": [str(root / "ok")],
        "allow_urls": [f"{origin}/ok"], "load": {"max_inflight": 8, "retry_after_s": 1},
        "jobs": {"db_path": str(root / "jobs.sqlite"), "workers": 0},
        "review": {"record": "all"}})
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
    more, found, notes = hardening(args.model, root, clip)
    rows, problems = rows + more, problems + found
    codes = sorted({code for _, code in burst})
    print("| class | tried | handled | not handled |\n|---|---:|---:|---:|")
    for name, tried, handled in rows:
        print(f"| {name} | {tried} | {handled} | {tried - handled} |")
    print(f"\nload statuses: {codes}; service healthy afterwards: {alive}")
    for note in notes:
        print(f"- {note}")
    for p in problems:
        print("NOT HANDLED", p)
    return 1 if problems or not alive else 0


if __name__ == "__main__":
    raise SystemExit(main())
