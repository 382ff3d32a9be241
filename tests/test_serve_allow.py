"""Allow-lists hold against an adversarial list of URLs and paths: each is parsed and
normalised before the check, and ambiguous forms are refused up front."""

from __future__ import annotations

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
import serve_fixtures
from fastapi.testclient import TestClient
from test_serve_app import assert_error, settings

from guardrail.serve.allow import check_path, parse_url
from guardrail.serve.app import create_app
from guardrail.serve.errors import BadRequest
from guardrail.serve.judge import LocalJudge

ALLOWED = parse_url("http://media.example/ok")


engine, clip = serve_fixtures.engine, serve_fixtures.clip   # shared fixtures

# (url, allowed?) ; refused = outside the prefix (403) or ambiguous (400)
UNDER = [
    ("http://media.example/ok/v.mp4", True),
    ("http://MEDIA.example:80/ok/v.mp4", True),              # case and default port normalised
    ("http://media.example/ok/./v.mp4", True),
    ("http://media.example/ok/a/../v.mp4", True),
    ("http://media.example/ok", True),
    ("http://media.example/ok?x=/../../etc", True),          # the query is not the path
    ("http://media.example/ok/../secret.mp4", False),        # dot segments leave the prefix
    ("http://media.example/ok/../../secret.mp4", False),
    ("http://media.example/ok/%2E%2E/secret.mp4", None),     # encoded dots: refused up front
    ("http://media.example/ok%2f..%2fsecret.mp4", None),     # encoded slash
    ("http://media.example/ok/..%5csecret.mp4", None),       # encoded backslash
    ("http://media.example/ok%00/v.mp4", None),              # encoded NUL
    ("http://media.example/ok/%252e%252e/secret", None),     # double encoding
    ("http://media.example/okay/v.mp4", False),              # not a whole segment
    ("http://media.example/OK/v.mp4", False),                # paths are case-sensitive
    ("http://media.example:8080/ok/v.mp4", False),
    ("https://media.example/ok/v.mp4", False),
    ("http://media.example.evil.test/ok/v.mp4", False),
    ("http://evil.test#@media.example/ok/v.mp4", None),
    ("http://media.example@evil.test/ok/v.mp4", None),      # user info
    ("http://user:pw@media.example/ok/v.mp4", None),
    ("http://media.example./ok/v.mp4", None),                # trailing-dot host
    ("http://media.example/ok/\nv.mp4", None),               # control characters
    ("http://media.ex\tample/ok/v.mp4", None),
    ("http://media.example/ok/v.mp4\x00", None),
    ("http://media.example\\@evil.test/ok/v.mp4", None),    # backslash
    ("http://media.example/ok/ v.mp4", None),
    ("http://médía.example/ok/v.mp4", None),                 # non-ASCII host
    ("http://media.example:80x/ok/v.mp4", None),
    ("http://media.example:99999/ok/v.mp4", None),
    ("HTTP://media.example/ok/v.mp4", True),
    ("gopher://media.example/ok/v.mp4", None),
]


@pytest.mark.parametrize("url, allowed", UNDER)
def test_urls_are_compared_on_normalised_components(url, allowed):
    if allowed is None:
        with pytest.raises(BadRequest):
            parse_url(url)
        return
    assert parse_url(url).under(ALLOWED) is allowed


def test_what_is_fetched_is_what_was_checked():
    got = parse_url("http://MEDIA.example:80/ok/a/../v%20x.mp4?q=1")
    assert got.geturl() == "http://media.example/ok/v%20x.mp4?q=1"
    assert parse_url("http://[::1]:8080/ok/").geturl() == "http://[::1]:8080/ok/"


def test_paths_refuse_nul_and_controls_and_resolve_symlinks(tmp_path):
    (tmp_path / "ok").mkdir()
    (tmp_path / "secret.mp4").write_bytes(b"x")
    (tmp_path / "ok" / "link.mp4").symlink_to(tmp_path / "secret.mp4")
    assert check_path(str(tmp_path / "ok" / "link.mp4")) == str(tmp_path / "secret.mp4")
    for bad in (f"{tmp_path}/ok/v.mp4\x00", f"{tmp_path}/ok/\x1bv.mp4"):
        with pytest.raises(BadRequest):
            check_path(bad)


def test_the_service_answers_4xx_json_for_every_bypass(engine, tmp_path, clip):
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "v.mp4").write_bytes(clip)
    (tmp_path / "secret.mp4").write_bytes(clip)
    (tmp_path / "ok" / "link.mp4").symlink_to(tmp_path / "secret.mp4")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    files = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{files.server_address[1]}"
    refs = {"dots": (f"{origin}/ok/../secret.mp4", 403),      # served by the file server if
            "encoded": (f"{origin}/ok/%2e%2e/secret.mp4", 400),   # the check let it through
            "control": (f"{origin}/ok/v.mp4\r\nX: y", 400),
            "nul path": (f"{tmp_path}/ok/v.mp4\x00", 400),
            "nul file": (f"file://{tmp_path}/ok/v.mp4%00", 400),
            "symlink out": (f"{tmp_path}/ok/link.mp4", 403),
            "fine": (f"{origin}/ok/./v.mp4", 200)}
    s = settings(tmp_path, allow_paths=[str(tmp_path / "ok")], allow_urls=[f"{origin}/ok"])
    try:
        with TestClient(create_app(LocalJudge(engine), s)) as c:
            for name, (ref, status) in refs.items():
                got = c.post("/v1/moderate", json={"video_url": ref})
                if status == 200:
                    assert got.status_code == 200, (name, got.text)
                else:
                    assert_error(got, status)
                job = c.post("/v1/jobs", json={"video_url": ref})
                assert job.status_code == (202 if status == 200 else status), (name, job.text)
                part = {"type": "video_url", "video_url": {"url": ref}}
                mod = c.post("/v1/moderations", json={"input": [part]})
                assert mod.status_code == status, (name, mod.text)
    finally:
        files.shutdown()


def test_a_slow_drip_upstream_is_cut_at_the_total_deadline(engine, tmp_path):
    """An allow-listed server that sends one byte every 0.2 s cannot hold the request past
    limits.decode_timeout_s (each read is quick, so only a total deadline stops it)."""
    import socket
    import time

    from guardrail.serve.settings import Limits

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    stop = threading.Event()

    def drip():
        conn, _ = listener.accept()
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
        while not stop.is_set():
            try:
                conn.sendall(b"x")
            except OSError:
                break
            time.sleep(0.2)
        conn.close()

    threading.Thread(target=drip, daemon=True).start()
    origin = f"http://127.0.0.1:{listener.getsockname()[1]}"
    s = settings(tmp_path, allow_urls=[f"{origin}/"], limits=Limits(decode_timeout_s=1.5))
    try:
        with TestClient(create_app(LocalJudge(engine), s)) as c:
            t0 = time.monotonic()
            reply = c.post("/v1/moderate", json={"video_url": f"{origin}/v.mp4"})
            took = time.monotonic() - t0
    finally:
        stop.set()
        listener.close()
    body = assert_error(reply, 422)
    assert "took over 1.5 s" in body["message"] and took < 5
