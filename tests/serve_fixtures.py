"""What the service's test modules share: the tiny Qwen2.5-VL engine and one mp4 upload as
fixtures (each module imports them, so each gets its own module-scoped engine), and polling."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import uvicorn

from guardrail.engine import GuardEngine
from guardrail.serve.settings import Sampling

# The service samples by coverage by default; tests of other features judge a fixed number of
# uniform frames (cheaper, and the frame counts they check stay put).
UNIFORM = Sampling(mode="uniform")


@pytest.fixture(scope="module")
def engine(tiny_model) -> GuardEngine:
    return GuardEngine.from_pretrained(tiny_model("qwen2_5_vl"))


@pytest.fixture(scope="module")
def clip(video_files) -> bytes:
    return video_files["mp4_h264"].read_bytes()


def wait_for(condition, timeout_s: float = 30, what: str = "condition not met in time") -> None:
    """Poll `condition` until it holds; fail with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@contextmanager
def live_server(app) -> Iterator[str]:
    """`app` on a real uvicorn server on 127.0.0.1 (for what a test client cannot do: trickle a
    body, hang up); yields its URL, stops it afterwards."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 30, "server did not start")
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
