"""The review console's store and API, on both stores (SQLite and a real PostgreSQL): what is
recorded, thumbnails, filters and pages, decisions and their history, tenants, the bound on
items, and the export that `guardrail bench score` / `bench calibrate` read."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import serve_fixtures
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from guardrail.serve.app import create_app, key_id
from guardrail.serve.judge import LocalJudge
from guardrail.serve.reviews import thumbnails
from guardrail.serve.settings import Jobs, Review, ServiceSettings
from guardrail.video import Clip, Video, VideoInfo, Window

engine, clip = serve_fixtures.engine, serve_fixtures.clip   # shared fixtures
UNIFORM = serve_fixtures.UNIFORM

# thresholds that make the tiny random model's verdicts certain: R1 always flagged, R2 never
FLAG = """name: review-set
version: 3
categories:
  - {id: R1, name: Always, blocked: ["anything"], threshold: 0.001}
  - {id: R2, name: Never, blocked: ["nothing"], threshold: 0.999}
"""
CLEAR = """name: clear-set
version: 1
categories:
  - {id: R2, name: Never, blocked: ["nothing"], threshold: 0.999}
"""
DB = ""


@pytest.fixture(autouse=True)
def _db(job_db):
    global DB
    DB = job_db


def app_for(tmp: Path, engine, *, keys=(), admins=(), workers=0, **review):
    jobs = Jobs(db_url=DB, spool_dir=str(tmp / "spool"), workers=workers, poll_s=0.05)
    settings = ServiceSettings(host="127.0.0.1", frames=2, window_s=1.0, sampling=UNIFORM,
                               jobs=jobs,
                               review=Review(**review), api_keys=list(keys),
                               admin_keys=list(admins))
    return create_app(LocalJudge(engine), settings)


def moderate(c, clip: bytes, policy: str = FLAG, key: str | None = None) -> dict:
    """One /v1/moderate call; returns once the service has kept it for review (or not)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    reply = c.post("/v1/moderate", files={"file": ("v.mp4", clip, "video/mp4")},
                   data={"policy": policy}, headers=headers)
    assert reply.status_code == 200, reply.text
    settle(c)
    return reply.json()


def settle(c, timeout_s: float = 30) -> None:
    """Wait until no verdict is waiting to be kept (they are kept in the background)."""
    serve_fixtures.wait_for(
        lambda: 'guardrail_queue_depth{queue="review"} 0.0' in c.get("/metrics").text,
        timeout_s, "verdicts still waiting to be kept")


def items(c, key: str | None = None, **query) -> list[dict]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    reply = c.get("/v1/reviews", params=query, headers=headers)
    assert reply.status_code == 200, reply.text
    return reply.json()["items"]


def test_flagged_sync_verdicts_are_recorded_with_thumbnails_per_window(engine, clip, tmp_path):
    with TestClient(app_for(tmp_path, engine)) as c:
        verdict = moderate(c, clip)
        moderate(c, clip, CLEAR)                        # not flagged: not kept by default
        (item,) = items(c)
        detail = c.get(f"/v1/reviews/{item['id']}").json()
        jpegs = [c.get(f"/v1/reviews/{item['id']}/frames/{f['k']}") for f in detail["frames"]]
        missing = c.get(f"/v1/reviews/{item['id']}/frames/{len(jpegs)}")
    assert verdict["flagged"] and item["flagged"] and item["status"] == "pending"
    assert item["policy_set"] == "review-set" and item["verdict"] == verdict
    assert detail["review"] is None and detail["history"] == [] and detail["source"] == "moderate"
    # every frame the model saw, window by window, in time order
    segments = verdict["segments"]
    assert len(segments) == 3                           # a 3 s clip in 1 s windows
    assert len(detail["frames"]) == verdict["video"]["frames_used"] == 3 * 2
    assert [f["window"] for f in detail["frames"]] == [0, 0, 1, 1, 2, 2]
    assert [f["k"] for f in detail["frames"]] == list(range(6))
    for f in detail["frames"]:
        seg = segments[f["window"]]
        assert seg["start_s"] <= f["t_s"] <= seg["end_s"]
    for reply in jpegs:
        assert reply.status_code == 200 and reply.headers["content-type"] == "image/jpeg"
        image = Image.open(io.BytesIO(reply.content))
        assert image.format == "JPEG" and image.size == (64, 48)   # small frames stay as are
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"


@pytest.mark.parametrize("record, kept", [("none", []), ("flagged", ["review-set"]),
                                          ("all", ["clear-set", "review-set"])])
def test_review_record_decides_which_sync_verdicts_are_kept(engine, clip, tmp_path, record,
                                                             kept):
    with TestClient(app_for(tmp_path, engine, record=record)) as c:
        moderate(c, clip)
        moderate(c, clip, CLEAR)
        reply = c.post("/v1/moderations", json={"input": [{"type": "video_url", "video_url": {
            "url": "data:video/mp4;base64," + __import__("base64").b64encode(clip).decode()}}],
            "policy": FLAG})
        assert reply.status_code == 200, reply.text
        settle(c)
        sets = sorted(i["policy_set"] for i in items(c))
    assert sets == sorted(kept + (["review-set"] if "review-set" in kept else []))


def test_job_verdicts_are_always_recorded(engine, clip, tmp_path):
    with TestClient(app_for(tmp_path, engine, record="none", workers=1)) as c:
        reply = c.post("/v1/jobs", files={"file": ("v.mp4", clip, "video/mp4")},
                       data={"policy": CLEAR})
        job_id = reply.json()["id"]
        deadline = time.monotonic() + 60
        while c.get(f"/v1/jobs/{job_id}").json()["status"] != "succeeded":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        (item,) = items(c)
        detail = c.get(f"/v1/reviews/{item['id']}").json()
        job = c.get(f"/v1/jobs/{job_id}").json()
    assert not item["flagged"] and detail["source"] == job_id
    assert item["verdict"] == job["verdict"] and len(detail["frames"]) == 6


def test_thumbnails_are_at_most_256_px_and_spread_over_the_windows():
    rng = np.random.default_rng(0)
    clips = tuple(Clip(Window(float(w), w + 1.0, (w * 10, w * 10 + 5), (w * 1.0, w + 0.5)),
                       rng.integers(0, 255, (2, 720, 1280, 3), dtype=np.uint8), 10.0)
                  for w in range(10))
    video = Video(VideoInfo("mp4", "h264", 10.0, 10.0, 1280, 720, 100, 1, "pyav"), clips)
    frames, jpegs = thumbnails(video, max_frames=5)
    assert len(frames) == len(jpegs) == 5
    assert [f.window for f in frames] == [0, 2, 5, 7, 9]      # first to last, evenly
    assert [f.k for f in frames] == list(range(5))
    for jpeg in jpegs:
        assert Image.open(io.BytesIO(jpeg)).size == (256, 144)
    all_frames, _ = thumbnails(video, max_frames=64)
    assert len(all_frames) == 20 and all_frames[1].t_s == 0.5


def test_filters_and_pages_newest_first(engine, clip, tmp_path):
    with TestClient(app_for(tmp_path, engine, record="all")) as c:
        for policy in (FLAG, CLEAR, FLAG, CLEAR, FLAG):
            moderate(c, clip, policy)
        every = items(c, limit=500)
        pages, cursor = [], None
        while True:
            reply = c.get("/v1/reviews", params={"limit": 2, **({"cursor": cursor} if cursor
                                                                else {})}).json()
            pages.append([i["id"] for i in reply["items"]])
            cursor = reply["next"]
            if cursor is None:
                break
        c.post(f"/v1/reviews/{every[0]['id']}", json={"labels": []})
        flagged = items(c, flagged="true")
        clear = items(c, flagged="false")
        r1 = items(c, category="R1")
        r2 = items(c, category="R2")
        lower = items(c, category="r1")                 # ids are exact on both stores
        like = c.get("/v1/reviews", params={"category": "R%"})
        by_set = items(c, policy_set="clear-set")
        pending = items(c, status="pending")
        reviewed = items(c, status="reviewed")
        facets = c.get("/v1/reviews/facets").json()
        bad_cursor = c.get("/v1/reviews", params={"cursor": "nope"})
        bad_status = c.get("/v1/reviews", params={"status": "maybe"})
    created = [i["created_at"] for i in every]
    assert len(every) == 5 and created == sorted(created, reverse=True)
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [i for p in pages for i in p] == [i["id"] for i in every]
    assert len(flagged) == 3 and len(clear) == 2 and len(r1) == 3 and r2 == [] and lower == []
    assert like.status_code == 422
    assert {i["policy_set"] for i in by_set} == {"clear-set"} and len(by_set) == 2
    assert len(pending) == 4 and [i["id"] for i in reviewed] == [every[0]["id"]]
    assert facets == {"policy_sets": ["clear-set", "review-set"], "categories": ["R1"]}
    assert bad_cursor.status_code == 400 and bad_cursor.json()["error"]["type"]
    assert bad_status.status_code == 422


def test_a_decision_is_stored_replaced_and_kept_in_history(engine, clip, tmp_path):
    with TestClient(app_for(tmp_path, engine, keys=["k-1"])) as c:
        auth = {"Authorization": "Bearer k-1"}
        moderate(c, clip, key="k-1")
        (item,) = items(c, key="k-1")
        url = f"/v1/reviews/{item['id']}"
        first = c.post(url, json={"labels": ["R2", "R1", "R1"], "note": "both"}, headers=auth)
        second = c.post(url, json={"labels": [], "note": "benign after all"}, headers=auth)
        unknown = c.post(url, json={"labels": ["C9"]}, headers=auth)
        extra = c.post(url, json={"labels": [], "score": 1}, headers=auth)
        form = c.post(url, data={"labels": "R1"}, headers=auth)
        nobody = c.post("/v1/reviews/rev-nope", json={"labels": []}, headers=auth)
        final = c.get(url, headers=auth).json()
    assert first.status_code == 200, first.text
    assert first.json()["review"]["labels"] == ["R1", "R2"]      # set order, no repeats
    assert first.json()["review"]["reviewer"] == key_id("k-1") and first.json()["status"] == (
        "reviewed")
    assert second.json()["review"] == final["review"]
    assert final["review"]["labels"] == [] and final["review"]["note"] == "benign after all"
    assert [h["labels"] for h in final["history"]] == [["R1", "R2"], []]
    assert [h["note"] for h in final["history"]] == ["both", "benign after all"]
    assert unknown.status_code == 422 and "C9" in unknown.json()["error"]["message"]
    assert extra.status_code == 422 and form.status_code == 415 and nobody.status_code == 404


def test_reviews_belong_to_the_key_that_asked(engine, clip, tmp_path):
    with TestClient(app_for(tmp_path, engine, keys=["a-key", "b-key"],
                            admins=["boss"])) as c:
        moderate(c, clip, key="a-key")
        (mine,) = items(c, key="a-key")
        theirs = items(c, key="b-key")
        everyone = items(c, key="boss")
        b = {"Authorization": "Bearer b-key"}
        get = c.get(f"/v1/reviews/{mine['id']}", headers=b)
        frame = c.get(f"/v1/reviews/{mine['id']}/frames/0", headers=b)
        post = c.post(f"/v1/reviews/{mine['id']}", json={"labels": []}, headers=b)
        anonymous = c.get("/v1/reviews")
        facets_b = c.get("/v1/reviews/facets", headers=b).json()
        facets_a = c.get("/v1/reviews/facets", headers={"Authorization": "Bearer a-key"}).json()
        export_b = c.get("/v1/reviews/export", headers=b)
    assert theirs == [] and [i["id"] for i in everyone] == [mine["id"]]
    assert get.status_code == frame.status_code == post.status_code == 404
    assert anonymous.status_code == 401 and export_b.text == ""
    assert facets_b == {"policy_sets": [], "categories": []}
    assert facets_a == {"policy_sets": ["review-set"], "categories": ["R1"]}


def test_the_console_signs_in_with_a_cookie_that_only_review_routes_take(engine, clip,
                                                                        tmp_path):
    with TestClient(app_for(tmp_path, engine, keys=["k-1"])) as c:
        locked = c.get("/review")
        page_says = {"Sec-Fetch-Site": "same-origin"}             # what a browser sends
        wrong = c.post("/review/login", data={"key": "nope"}, follow_redirects=False,
                       headers=page_says)
        unsaid = c.post("/review/login", data={"key": "k-1"}, follow_redirects=False)
        null = c.post("/review/login", data={"key": "k-1"}, follow_redirects=False,
                      headers={"Origin": "null"})
        cross = c.post("/review/login", data={"key": "k-1"}, follow_redirects=False,
                       headers={"Sec-Fetch-Site": "cross-site"})
        elsewhere = c.post("/review/login", data={"key": "k-1"}, follow_redirects=False,
                           headers={"Origin": "http://evil.example"})
        assert not c.cookies
        right = c.post("/review/login", data={"key": "k-1"}, follow_redirects=False,
                       headers={"Sec-Fetch-Site": "same-origin",
                                "Origin": "http://testserver"})
        page = c.get("/review")                          # the client keeps the cookie
        listed = c.get("/v1/reviews")
        jobs = c.get("/v1/jobs/job-x")
        policies = c.get("/v1/policies")
        logout_elsewhere = c.post("/review/logout", headers={"Sec-Fetch-Site": "cross-site"},
                                  follow_redirects=False)
        still = c.get("/review")
        out = c.post("/review/logout", follow_redirects=False, headers=page_says)
        after = c.get("/review")                         # the logout expired the cookie
    assert locked.status_code == 401 and 'name="key"' in locked.text
    assert "frame-ancestors 'none'" in locked.headers["content-security-policy"]
    assert "guardrail review" in locked.text and "id=\"queue\"" not in locked.text
    assert wrong.status_code == 401 and "not accepted" in wrong.text
    assert cross.status_code == elsewhere.status_code == 403       # no sign-in from other sites
    assert unsaid.status_code == null.status_code == 403           # nor from nowhere
    assert right.status_code == 303 and right.headers["location"] == "/review"
    cookies = right.headers.get_list("set-cookie")
    assert sorted(x.split("Path=")[1].split(";")[0] for x in cookies) == ["/review",
                                                                         "/v1/reviews"]
    for x in cookies:
        assert x.startswith("guardrail_key=k-1;") and "httponly" in x.lower()
        assert "samesite=strict" in x.lower()
    assert page.status_code == 200 and 'id="queue"' in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'sha256-" in csp and "unsafe-inline'; frame" not in csp
    assert listed.status_code == 200
    assert jobs.status_code == policies.status_code == 401   # not an API key elsewhere
    assert logout_elsewhere.status_code == 403 and still.status_code == 200
    assert out.status_code == 303 and after.status_code == 401


def test_items_are_bounded_oldest_reviewed_out_first(engine, clip, tmp_path):
    with TestClient(app_for(tmp_path, engine, record="all", max_items=3)) as c:
        for _ in range(3):
            moderate(c, clip)
        newest, middle, oldest = items(c)
        c.post(f"/v1/reviews/{middle['id']}", json={"labels": ["R1"]})
        moderate(c, clip)                                   # 4 > 3: the reviewed one goes
        after_one = [i["id"] for i in items(c)]
        moderate(c, clip)                                   # none reviewed: the oldest goes
        after_two = [i["id"] for i in items(c)]
        gone = c.get(f"/v1/reviews/{middle['id']}/frames/0")
    assert len(after_one) == 3 and middle["id"] not in after_one and oldest["id"] in after_one
    assert len(after_two) == 3 and oldest["id"] not in after_two and newest["id"] in after_two
    assert gone.status_code == 404


def test_export_is_bench_predictions_and_calibrate_and_score_run_on_it(engine, clip, tmp_path):
    from guardrail.bench.predictions import read_predictions
    from guardrail.cli import app as cli

    with TestClient(app_for(tmp_path, engine, record="all")) as c:
        for _ in range(6):
            moderate(c, clip)
        every = items(c)
        for n, item in enumerate(every[:5]):               # one stays pending: not exported
            labels = ["R1"] if n % 2 else []
            c.post(f"/v1/reviews/{item['id']}", json={"labels": labels, "note": f"n{n}"})
        export = c.get("/v1/reviews/export")
        only_set = c.get("/v1/reviews/export", params={"policy_set": "clear-set"})
    assert export.status_code == 200
    assert export.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(x) for x in export.text.splitlines()]
    assert len(lines) == 5 and only_set.text == ""
    path = tmp_path / "export.jsonl"
    path.write_text(export.text)
    preds, bad = read_predictions(path)
    assert bad == 0 and set(preds) == {i["id"] for i in every[:5]}
    for item in every[:5]:
        line = next(x for x in lines if x["video_path"] == item["id"])
        assert {k: v for k, v in line.items() if k not in ("video_path", "labels")} == (
            item["verdict"])
    assert sorted(len(p.labels) for p in preds.values()) == [0, 0, 0, 1, 1]

    runner = CliRunner()
    fitted = runner.invoke(cli, ["bench", "calibrate", "--predictions", str(path), "--out",
                                 str(tmp_path / "calibration.json")])
    assert fitted.exit_code == 0, fitted.output
    calibration = json.loads((tmp_path / "calibration.json").read_text())
    assert "R1" in json.dumps(calibration)
    scored = runner.invoke(cli, ["bench", "score", "--predictions", str(path), "--out",
                                 str(tmp_path / "score"), "--json"])
    assert scored.exit_code == 0, scored.output
    metrics = json.loads((tmp_path / "score" / "metrics.json").read_text())
    assert metrics["n_videos"] == 5


def _store():
    from guardrail.serve.jobs import JobStore
    from guardrail.serve.reviews import ReviewStore

    jobs = JobStore(DB, Path(DB.removeprefix("sqlite:///")).parent / "spool"
                    if DB.startswith("sqlite") else "/tmp/guardrail-review-test-spool")
    return ReviewStore(jobs.db, max_items=100)


def _verdict(flagged: bool = True):
    from guardrail.verdict import Verdict

    return Verdict.model_validate({
        "flagged": flagged, "categories": [{"id": "R1", "name": "Always", "flagged": flagged,
                                            "score": 0.9 if flagged else 0.1,
                                            "threshold": 0.5}],
        "model": "m", "policy_set": "s", "layout": "parallel", "mode": "fast",
        "video": {"duration_s": 1.0, "frames_used": 0},
        "pruning": {"keep_ratio": 1.0, "kept_tokens": 0, "total_tokens": 0}})


def test_a_decision_waits_for_a_concurrent_one_instead_of_missing_the_item():
    """Two reviewers saving the same item at once: the second waits for the first (on
    PostgreSQL a skip-locked read used to answer "no such item")."""
    import threading

    reviews = _store()
    item = reviews.record(_verdict(), [], [], "moderate", None)
    got = {}
    with reviews.db.tx() as db:                       # another reviewer's save, in progress
        db.execute("UPDATE review_items SET note = 'first' WHERE id = ?", (item,))
        other = threading.Thread(target=lambda: got.update(
            second=reviews.decide(item, ["R1"], "second", None)))
        other.start()
        time.sleep(0.3)
        assert other.is_alive()                       # waiting for the row, not giving up
    other.join(30)
    assert got["second"] is not None and got["second"].review.note == "second"


def test_a_job_run_again_replaces_its_item_and_its_decisions():
    reviews = _store()
    first = reviews.record(_verdict(True), [], [], "job-abc", None)
    reviews.decide(first, ["R1"], "seen", None)
    again = reviews.record(_verdict(False), [], [], "job-abc", None)
    item = reviews.get(again)
    assert again == first == "rev-abc" and item.status == "pending" and not item.flagged
    assert reviews.history(again) == [] and item.review is None


def test_the_recorder_bounds_sync_verdicts_never_starves_jobs_and_frees_waiters_on_close():
    import asyncio

    from guardrail.serve.metrics import Metrics
    from guardrail.serve.pipeline import Recorder

    reviews = _store()
    video = Video(VideoInfo("mp4", "h264", 1.0, 10.0, 64, 48, 10, 1, "pyav"), (Clip(
        Window(0.0, 1.0, (0,), (0.0,)), np.zeros((1, 48, 64, 3), np.uint8), 10.0),))
    metrics = Metrics()

    def count(outcome: str) -> float:
        return metrics.registry.get_sample_value("guardrail_review_items_total",
                                                 {"outcome": outcome}) or 0.0

    async def scenario():
        rec = Recorder(reviews, 4, metrics, max_pending=2)
        for _ in range(5):                   # no await in between: the worker has not run yet
            await rec.keep(_verdict(), video, "moderate", None)
        assert rec.pending() == 2 and count("dropped") == 3
        await asyncio.wait_for(rec.keep(_verdict(), video, "job-1", None, wait=True), 30)
        assert rec.pending() == 0 and count("recorded") == 3     # the job got in and was kept
        # close with waiters still queued: every waiter is released, nothing is left counted
        await rec.keep(_verdict(), video, "moderate", None)
        job = asyncio.create_task(rec.keep(_verdict(), video, "job-2", None, wait=True))
        await asyncio.sleep(0)
        await rec.close(0)
        await asyncio.wait_for(job, 5)
        assert rec.pending() == 0
        await rec.keep(_verdict(), video, "job-3", None, wait=True)   # after close: not kept
        assert rec.pending() == 0

    asyncio.run(scenario())
    assert count("recorded") + count("dropped") == 9


def test_concurrent_decisions_leave_the_current_one_last_in_the_history():
    """20 reviewers saving one item at once: whichever is current is the newest history entry
    (the time is taken under the row lock, so history order is decision order)."""
    from concurrent.futures import ThreadPoolExecutor

    reviews = _store()
    item = reviews.record(_verdict(), [], [], "moderate", None)
    with ThreadPoolExecutor(20) as pool:
        list(pool.map(lambda k: reviews.decide(item, [], f"note {k}", None), range(20)))
    current, history = reviews.get(item).review, reviews.history(item)
    assert len(history) == 20 and history[-1].note == current.note
    assert [h.reviewed_at for h in history] == sorted(h.reviewed_at for h in history)
