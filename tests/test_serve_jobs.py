"""Async jobs on both stores (SQLite and a real PostgreSQL): persistence, resumption after a
restart, webhook retries and delivery rules."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import serve_fixtures
from fastapi.testclient import TestClient

from guardrail.serve.app import create_app
from guardrail.serve.inputs import Media
from guardrail.serve.jobs import JobStore
from guardrail.serve.judge import JudgeRequest, LocalJudge
from guardrail.serve.runner import job_request
from guardrail.serve.settings import Jobs, ServiceSettings

engine, clip = serve_fixtures.engine, serve_fixtures.clip   # shared fixtures
UNIFORM = serve_fixtures.UNIFORM
wait_for = serve_fixtures.wait_for


DB = ""          # the job database of the running test: SQLite or PostgreSQL (see _db)


@pytest.fixture(autouse=True)
def _db(job_db):
    """Every test of this module runs on both stores."""
    global DB
    DB = job_db


def jobs(tmp: Path, **changes) -> Jobs:
    base = {"db_url": DB, "spool_dir": str(tmp / "jobs.sqlite.inputs"), "poll_s": 0.05,
            "lease_s": 2.0, "webhook_backoff_s": 0.05}
    return Jobs(**{**base, **changes})


def store_for(tmp: Path) -> JobStore:
    return JobStore(DB, tmp / "jobs.sqlite.inputs")


def app_for(engine, tmp: Path, **job_changes):
    settings = ServiceSettings(host="127.0.0.1", frames=2, sampling=UNIFORM,
                               jobs=jobs(tmp, **job_changes))
    return create_app(LocalJudge(engine), settings)


def submit(client, data: bytes, **fields) -> str:
    reply = client.post("/v1/jobs", files={"file": ("v.mp4", data, "video/mp4")}, data=fields)
    assert reply.status_code == 202, reply.text
    assert reply.json()["status"] == "queued"
    return reply.json()["id"]


def wait_job(client, job_id: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.05)
    pytest.fail(f"job {job_id} did not end in {timeout_s} s")


class Receiver:
    """A webhook receiver on 127.0.0.1 that answers with scripted statuses, then 200."""

    def __init__(self, statuses: list[int]):
        self.statuses, self.calls = list(statuses), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                outer.calls.append((dict(self.headers), json.loads(body)))
                self.send_response(outer.statuses.pop(0) if outer.statuses else 200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, n: int, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.calls) < n and time.monotonic() < deadline:
            time.sleep(0.02)

    def close(self) -> None:
        self.server.shutdown()


def test_job_result_matches_moderate(engine, tmp_path, clip):
    with TestClient(app_for(engine, tmp_path)) as c:
        job = wait_job(c, submit(c, clip, frames="4"))
        direct = c.post("/v1/moderate", files={"file": ("v.mp4", clip, "video/mp4")},
                        data={"frames": "4"}).json()
    assert job["status"] == "succeeded" and job["error"] is None
    assert set(job) == {"id", "status", "verdict", "error", "created_at", "updated_at"}
    assert job["created_at"] <= job["updated_at"]
    assert [c["score"] for c in job["verdict"]["categories"]] == \
        [c["score"] for c in direct["categories"]]


def test_bad_video_job_fails_with_typed_error(engine, tmp_path):
    with TestClient(app_for(engine, tmp_path)) as c:
        job = wait_job(c, submit(c, b"definitely not a video"))
        assert c.get("/v1/jobs/job-nope").status_code == 404
    assert job["status"] == "failed" and job["verdict"] is None
    assert job["error"]["type"] == "unsupported_media"


def test_job_from_an_allow_listed_server_path(engine, tmp_path, clip):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "v.mp4").write_bytes(clip)
    settings = ServiceSettings(host="127.0.0.1", frames=2, sampling=UNIFORM,
                               allow_paths=[str(tmp_path / "in")],
                               jobs=jobs(tmp_path))
    with TestClient(create_app(LocalJudge(engine), settings)) as c:
        ok = c.post("/v1/jobs", json={"video_url": f"file://{tmp_path}/in/v.mp4"})
        refused = c.post("/v1/jobs", json={"video_url": "file:///etc/hostname"})
        assert ok.status_code == 202 and refused.status_code == 403
        assert wait_job(c, ok.json()["id"])["status"] == "succeeded"


def test_bad_job_requests_are_refused_before_queueing(engine, tmp_path, clip):
    with TestClient(app_for(engine, tmp_path, webhook_allow=["https://hooks.example/"])) as c:
        bad_hook = c.post("/v1/jobs", files={"file": ("v.mp4", clip, "video/mp4")},
                          data={"webhook_url": "http://169.254.169.254/"})
        bad_policy = c.post("/v1/jobs", json={"video_base64": "AAAA", "policy": "x: 1"})
        bad_json = c.post("/v1/jobs", content=b"{", headers={"content-type": "application/json"})
    assert [r.status_code for r in (bad_hook, bad_policy, bad_json)] == [403, 422, 400]
    assert store_for(tmp_path).counts() == {}


def test_job_queue_is_bounded(engine, tmp_path, clip):
    with TestClient(app_for(engine, tmp_path, workers=0, max_queued=1)) as c:
        submit(c, clip)
        full = c.post("/v1/jobs", files={"file": ("v.mp4", clip, "video/mp4")})
    assert full.status_code == 429 and full.headers["retry-after"] == "1"
    assert full.json()["error"]["type"] == "overloaded"


def test_jobs_survive_a_restart_and_resume(engine, tmp_path, clip):
    """Finished results stay readable; a queued job and one whose runner died both run."""
    with TestClient(app_for(engine, tmp_path)) as c:
        done = wait_job(c, submit(c, clip))
    store = store_for(tmp_path)
    req = job_request(JudgeRequest(), None, Media("video", clip))
    crashed = store.create(req, clip, None)
    queued = store.create(req, clip, None)
    assert store.claim("dead-runner", lease_s=0.01, max_attempts=3).id == crashed.id
    assert store.get(crashed.id).status == "running" and store.get(queued.id).status == "queued"
    time.sleep(0.05)
    with TestClient(app_for(engine, tmp_path)) as c:  # the restarted service
        assert c.get(f"/v1/jobs/{done['id']}").json() == done
        for job_id in (queued.id, crashed.id):
            assert wait_job(c, job_id)["status"] == "succeeded"
    assert not any(p.is_file() for p in (tmp_path / "jobs.sqlite.inputs").rglob("*"))  # cleaned


def test_webhook_retries_with_backoff(engine, tmp_path, clip):
    hook = Receiver([500, 503])
    try:
        with TestClient(app_for(engine, tmp_path, webhook_allow=[hook.url])) as c:
            job_id = submit(c, clip, webhook_url=hook.url)
            wait_job(c, job_id)
            hook.wait(3)
            store = store_for(tmp_path)
            wait_for(lambda: store.get(job_id).webhook_state == "delivered")
    finally:
        hook.close()
    assert len(hook.calls) == 3
    attempts = [int(h["x-guardrail-delivery-attempt"]) for h, _ in hook.calls]
    assert attempts == [1, 2, 3]
    headers, body = hook.calls[-1]
    assert headers["x-guardrail-job"] == job_id and body["id"] == job_id
    assert body["status"] == "succeeded" and body["verdict"]["policy_set"] == "safewatch"


def test_webhook_gives_up(engine, tmp_path, clip):
    gone = Receiver([404])
    down = Receiver([500] * 10)
    try:
        with TestClient(app_for(engine, tmp_path, webhook_attempts=3,
                                webhook_allow=[gone.url, down.url])) as c:
            ids = [submit(c, clip, webhook_url=gone.url), submit(c, clip, webhook_url=down.url)]
            for job_id in ids:
                wait_job(c, job_id)
            store = store_for(tmp_path)
            wait_for(lambda: all(store.get(i).webhook_state == "failed" for i in ids))
            time.sleep(0.3)  # no fourth try
    finally:
        gone.close()
        down.close()
    assert len(gone.calls) == 1 and len(down.calls) == 3


def test_store_claims_are_exclusive_and_bounded(tmp_path):
    store = store_for(tmp_path)
    job = store.create({"x": 1}, b"data", "http://127.0.0.1:9/")
    local = store.input_file(job)                 # a spool file, or a copy from PostgreSQL
    assert Path(local).read_bytes() == b"data"
    first = store.claim("a", lease_s=60, max_attempts=2)
    assert first.id == job.id and first.attempts == 1
    assert store.claim("b", 60, 2) is None  # leased to a
    assert not store.finish(job.id, "b", {"v": 1}, None)  # b does not hold it
    store.release(job.id, "a", count_attempt=True)
    assert store.claim("b", 60, 2).attempts == 2
    store.release(job.id, "b", count_attempt=True)
    assert store.claim("c", 60, 2) is None  # out of attempts: failed for good
    failed = store.get(job.id)
    assert failed.status == "failed" and "2 attempts" in failed.error["message"]
    assert failed.webhook_state == "pending" and not Path(local).exists()
    assert store.input_file(failed) in (None, job.input_path)      # the input is gone
    assert store.claim_webhook(10).id == job.id and store.claim_webhook(10) is None


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/hook", "http://localhost:9/hook", "http://2130706433/hook",
    "http://0x7f.0.0.1/hook", "http://[::1]/hook", "http://[::ffff:127.0.0.1]/hook",
    "http://169.254.169.254/latest/meta-data", "http://10.0.0.1/hook", "http://192.168.1.1/",
    "http://100.64.0.1/", "http://[fd00:ec2::254]/", "http://0.0.0.0/"])
def test_webhooks_to_non_public_addresses_are_refused_by_default(engine, tmp_path, clip, url):
    with TestClient(app_for(engine, tmp_path)) as c:
        reply = c.post("/v1/jobs", files={"file": ("v.mp4", clip, "video/mp4")},
                       data={"webhook_url": url})
    assert reply.status_code == 403, reply.text
    assert "non-public address" in reply.json()["error"]["message"]
    assert store_for(tmp_path).counts() == {}


@pytest.mark.parametrize("url", ["http://user@127.0.0.1/", "http://exa mple.com/",
                                 "http://example.com/%2e%2e/", "ftp://example.com/"])
def test_malformed_webhooks_are_400_or_403(engine, tmp_path, clip, url):
    with TestClient(app_for(engine, tmp_path)) as c:
        reply = c.post("/v1/jobs", files={"file": ("v.mp4", clip, "video/mp4")},
                       data={"webhook_url": url})
    assert reply.status_code in (400, 403), reply.text


def test_a_named_host_is_delivered_to_the_checked_address(engine, tmp_path, clip):
    hook = Receiver([])
    port = hook.server.server_address[1]
    named = f"http://localhost:{port}/hook"
    try:
        with TestClient(app_for(engine, tmp_path, webhook_allow=[named])) as c:
            job_id = submit(c, clip, webhook_url=named)
            wait_job(c, job_id)
            hook.wait(1)
    finally:
        hook.close()
    headers, body = hook.calls[0]
    assert headers["host"] == f"localhost:{port}" and body["id"] == job_id


def test_an_undeliverable_webhook_fails_once_not_forever(engine, tmp_path, clip, caplog):
    """A stored URL that can no longer be delivered (its allow rule was removed, or the client
    rejects it) costs one attempt, then the webhook is failed for good, without a traceback."""
    store = store_for(tmp_path)
    req = job_request(JudgeRequest(), None, Media("video", clip))
    job = store.create(req, clip, "http://127.0.0.1:9/hook")
    with TestClient(app_for(engine, tmp_path)) as c:              # default rules: loopback out
        wait_job(c, job.id)
        wait_for(lambda: store.get(job.id).webhook_state == "failed")
        time.sleep(0.3)
    assert store.get(job.id).webhook_attempts == 1
    assert "Traceback" not in caplog.text


def test_claims_are_exclusive_across_threads(tmp_path):
    """Many runners claiming at once (threads here, replicas on several nodes in a cluster):
    every job is claimed exactly once."""
    from concurrent.futures import ThreadPoolExecutor

    store = store_for(tmp_path)
    ids = {store.create({"n": i}, None, None).id for i in range(40)}

    def runner(name: str) -> list[str]:
        got = []
        while (job := store.claim(name, lease_s=60, max_attempts=3)) is not None:
            got.append(job.id)
        return got

    with ThreadPoolExecutor(8) as pool:
        claimed = [j for part in pool.map(runner, [f"r{i}" for i in range(8)]) for j in part]
    assert sorted(claimed) == sorted(ids)


def test_jobs_belong_to_the_key_that_created_them(engine, tmp_path, clip):
    settings = ServiceSettings(host="127.0.0.1", frames=2, sampling=UNIFORM, jobs=jobs(tmp_path),
                               api_keys=["alice", "bob"], admin_keys=["root"])
    with TestClient(create_app(LocalJudge(engine), settings)) as c:
        def as_(key):
            return {"authorization": f"Bearer {key}"}
        made = c.post("/v1/jobs", files={"file": ("v.mp4", clip, "video/mp4")},
                      headers=as_("alice"))
        assert made.status_code == 202
        job_id = made.json()["id"]
        assert c.get(f"/v1/jobs/{job_id}", headers=as_("alice")).status_code == 200
        other = c.get(f"/v1/jobs/{job_id}", headers=as_("bob"))
        assert other.status_code == 404 and other.json()["error"]["type"] == "not_found"
        assert c.get(f"/v1/jobs/{job_id}", headers=as_("root")).status_code == 200
        assert c.get(f"/v1/jobs/{job_id}").status_code == 401
    stored = store_for(tmp_path).get(job_id)
    assert stored.tenant.startswith("key-") and "alice" not in stored.tenant


def test_a_start_removes_what_ended_jobs_left_in_the_spool(tmp_path):
    """A replica starting beside others (one spool folder): inputs or copies of ended jobs,
    dead writers' `.part` files and old strays go; what a queued or running job uses, a live
    writer's `.part` and a young file (an upload between its file and its row) stay."""
    store = store_for(tmp_path)
    spool = tmp_path / "jobs.sqlite.inputs"
    ended, running, queued = (store.create({"n": i}, b"data%d" % i, None) for i in range(3))
    copies = {job.id: Path(store.input_file(job)) for job in (ended, running, queued)}
    assert store.claim("r", 60, 3).id == ended.id and store.finish(ended.id, "r", {}, None)
    assert not copies[ended.id].exists()               # removed when the job ended ...
    copies[ended.id].write_bytes(b"left over")         # ... but a crash can leave it
    assert store.claim("another-replica", 60, 3).id == running.id
    old = time.time() - 2 * 3600
    names = {
        f"{queued.id}.999999999-0.part": None,         # its writer died (no such pid)
        f"{running.id}.{os.getpid()}-1.part": None,    # a live writer fetching it
        f"{queued.id}.{os.getpid()}-2.part": old,      # a live pid, but hours old
        "job-between-file-and-row": None, "job-stray": old}
    for name, mtime in names.items():
        (spool / name).write_bytes(b"x")
        if mtime:
            os.utime(spool / name, (mtime, mtime))
    (spool / "uploads-999999999").mkdir()               # a dead process's uploads
    (spool / f"uploads-{os.getpid()}").mkdir(exist_ok=True)
    store_for(tmp_path)                                  # a replica starts
    assert sorted(p.name for p in spool.iterdir()) == sorted([
        running.id, queued.id, f"{running.id}.{os.getpid()}-1.part",
        "job-between-file-and-row", f"uploads-{os.getpid()}"])
    assert Path(store.input_file(store.get(running.id))).read_bytes() == b"data1"
    assert Path(store.input_file(store.get(queued.id))).read_bytes() == b"data2"


def test_a_jobs_local_file_goes_when_it_ends_or_is_handed_back(tmp_path):
    """Finished or failed: its input file goes. Released to the queue (a stop): on PostgreSQL
    the local copy goes too (another node may run it; the database keeps the input), on
    SQLite the file is the input and stays."""
    store = store_for(tmp_path)
    done, failed, released = (store.create({"n": i}, b"data", None) for i in range(3))
    local = {}
    for job in (done, failed, released):
        assert store.claim("r", 60, 3).id == job.id
        local[job.id] = Path(store.input_file(job))
    assert store.finish(done.id, "r", {"v": 1}, None)
    assert store.finish(failed.id, "r", None, {"type": "x", "message": "y"})
    store.release(released.id, "r")
    assert not local[done.id].exists() and not local[failed.id].exists()
    assert local[released.id].exists() == (not store.db.inputs_in_db)
    again = store.claim("r2", 60, 3)
    assert again.id == released.id and Path(store.input_file(again)).read_bytes() == b"data"
    if store.db.inputs_in_db:      # its lease ran out here and another node finished it
        store.release(released.id, "r2", count_attempt=True)
        assert store.claim("r3", 0.01, 3).id == released.id
        Path(store.input_file(store.get(released.id))).write_bytes(b"data")
        time.sleep(0.05)
        assert store.claim("r4", 60, 3).id == released.id
        assert store.finish(released.id, "r4", {"v": 1}, None)
        local[released.id].write_bytes(b"data")                 # r3's node's copy
        assert not store.finish(released.id, "r3", {"v": 2}, None)
        assert not local[released.id].exists()


def test_the_default_spool_is_one_folder_per_store_not_per_process(tmp_path, monkeypatch):
    settings = Jobs(db_url=DB)
    spool = settings.spool()
    if not settings.postgres():
        assert spool == Path(DB.removeprefix("sqlite:///") + ".inputs")
        return
    other_db = DB.rsplit("/", 1)[0] + "/another_db"
    with_password = DB.replace("postgres@", "postgres:s3cret@")
    assert Jobs(db_url=with_password).spool() == spool and "s3cret" not in str(spool)
    assert Jobs(db_url=other_db).spool() != spool
    monkeypatch.setattr(os, "getpid", lambda: 4242)                # another replica
    assert Jobs(db_url=DB).spool() == spool
    try:
        first, second = JobStore(DB, spool), JobStore(DB, Jobs(db_url=DB).spool())
        job = first.create({}, b"data", None)
        assert second.claim("r", 60, 3).id == job.id
        assert Path(second.input_file(job)).parent == spool
        JobStore(DB, spool)                        # a third replica starts: the copy stays
        assert second.finish(job.id, "r", {}, None) and not any(spool.iterdir())
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def test_an_older_sqlite_store_gains_the_new_columns(tmp_path):
    import sqlite3

    if not DB.startswith("sqlite"):
        pytest.skip("a migration of the first release's SQLite file")
    path = DB.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, status TEXT NOT NULL, request TEXT "
                   "NOT NULL, input_path TEXT, verdict TEXT, error TEXT, owner TEXT, lease_until "
                   "REAL, attempts INTEGER NOT NULL DEFAULT 0, webhook_url TEXT, webhook_state "
                   "TEXT, webhook_attempts INTEGER NOT NULL DEFAULT 0, webhook_due REAL, "
                   "created_at REAL NOT NULL, updated_at REAL NOT NULL)")
        db.execute("INSERT INTO jobs (id, status, request, created_at, updated_at) VALUES "
                   "('job-old', 'succeeded', '{}', 1.0, 1.0)")
    store = store_for(tmp_path)
    assert store.get("job-old").tenant is None and store.get("job-old").status == "succeeded"
    assert store.create({}, None, None, tenant="key-1").tenant == "key-1"


def test_postgres_connections_are_pooled_and_dropped_ones_replaced(tmp_path, request):
    """PostgreSQL: store calls reuse a few open connections instead of one per call, and a
    connection the server closed (restart, idle timeout) is replaced, not handed out again."""
    if not DB.startswith("postgresql"):
        pytest.skip("PostgreSQL only")
    import psycopg

    store = store_for(tmp_path)
    before = store.db.connects
    for i in range(30):
        store.get(store.create({"n": i}, None, None).id)
    assert store.db.connects - before <= 1
    opened = store.db.connects
    with psycopg.connect(DB, autocommit=True) as admin:      # drop every other session
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    time.sleep(0.2)                                           # the server's goodbye arrives
    assert store.counts() == {"queued": 30}   # a dropped connection is not handed out
    assert store.db.connects == opened + 1


def test_racing_policy_versions_give_one_winner_and_only_growing_versions(tmp_path):
    """20 replicas adding v2 at once: exactly one succeeds, the rest are told it is not newer
    (no integrity error); then versions 3..22 at once: stored in an order in which versions
    only grow."""
    from concurrent.futures import ThreadPoolExecutor

    store = store_for(tmp_path)
    store.add_policy("p", 1, "sha256:1", "v1")
    with ThreadPoolExecutor(20) as pool:
        same = list(pool.map(lambda k: store.add_policy("p", 2, f"sha256:{k}", "v2"), range(20)))
        assert sorted(same, key=str) == [2] + [None] * 19
        list(pool.map(lambda v: store.add_policy("p", v, f"sha256:v{v}", "v"), range(3, 23)))
    stored = store.policy_versions("p")
    by_time = [v["version"] for v in sorted(stored, key=lambda v: (v["created_at"],
                                                                    v["version"]))]
    assert by_time == sorted(by_time) and by_time[0] == 1 and by_time[1] == 2
