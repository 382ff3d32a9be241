"""Store faults: while the job store cannot be reached (PostgreSQL refusing connections, a
SQLite file that cannot be opened), every route that needs it answers 503 JSON with
Retry-After, synchronous moderation keeps judging from the policies the replica has, /healthz
reports the store (readiness) while /livez stays 200, /metrics still scrapes, and nothing is
lost: a queued job finishes once the store is back. Both stores."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import serve_fixtures
from fastapi.testclient import TestClient

from guardrail.serve import store as store_module
from guardrail.serve.app import create_app
from guardrail.serve.judge import LocalJudge
from guardrail.serve.settings import Jobs, Review, ServiceSettings

engine, clip = serve_fixtures.engine, serve_fixtures.clip
wait_for = serve_fixtures.wait_for


@contextmanager
def store_down(url: str):
    """Make the store unreachable for the duration, then bring it back."""
    if url.startswith("postgresql"):
        import psycopg

        admin_url, name = url.rsplit("/", 1)[0] + "/postgres", url.rsplit("/", 1)[1]
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = %s", (name,))
        try:
            yield
        finally:
            with psycopg.connect(admin_url, autocommit=True) as admin:
                admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        return
    path = Path(url.removeprefix("sqlite:///"))
    aside = path.with_name(path.name + ".aside")
    path.rename(aside)
    path.mkdir()                          # a directory where the file was: cannot be opened
    try:
        yield
    finally:
        path.rmdir()
        aside.rename(path)


@pytest.fixture
def service(engine, tmp_path, job_db, monkeypatch):
    monkeypatch.setattr(store_module, "FAULT_MEMORY_S", 0.2)
    settings = ServiceSettings(
        host="127.0.0.1", frames=2, sampling=serve_fixtures.UNIFORM,
        review=Review(record="all"),
        jobs=Jobs(db_url=job_db, spool_dir=str(tmp_path / "spool"), poll_s=0.05, lease_s=2.0))
    with TestClient(create_app(LocalJudge(engine), settings)) as client:
        yield client, job_db


def _unavailable(reply) -> None:
    assert reply.status_code == 503, reply.text
    assert reply.json()["error"]["type"] == "store_unavailable"
    assert int(reply.headers["Retry-After"]) >= 1


def test_store_faults_are_503_and_moderation_keeps_working(service, clip):
    client, url = service
    assert client.get("/healthz").json()["store"] == "ok"
    assert client.post("/v1/moderate", files={"file": ("v.mp4", clip, "video/mp4")}
                       ).status_code == 200       # the replica has seen the default set now
    job = client.post("/v1/jobs", files={"file": ("v.mp4", clip, "video/mp4")}).json()["id"]
    with store_down(url):
        _unavailable(client.post("/v1/jobs", files={"file": ("v.mp4", clip, "video/mp4")}))
        _unavailable(client.get(f"/v1/jobs/{job}"))
        _unavailable(client.get("/v1/policies/safewatch/versions"))
        _unavailable(client.get("/v1/reviews"))
        weapons = (Path(__file__).parents[1] / "policies" / "weapons.yaml").read_text()
        _unavailable(client.put("/v1/policies/weapons",
                                content=weapons.replace("version: 1", "version: 2").encode()))
        health = client.get("/healthz")
        assert health.status_code == 503 and "Retry-After" in health.headers
        assert health.json()["status"] == "degraded" and health.json()["store"] == "unavailable"
        assert client.get("/livez").status_code == 200
        scraped = client.get("/metrics")
        assert scraped.status_code == 200 and "guardrail_store_up 0.0" in scraped.text
        verdict = client.post("/v1/moderate", files={"file": ("v.mp4", clip, "video/mp4")})
        assert verdict.status_code == 200, verdict.text    # from the policies it has
        assert verdict.json()["policy_set"] == "safewatch"
    wait_for(lambda: client.get("/healthz").status_code == 200, 30, "store not back")
    wait_for(lambda: client.get(f"/v1/jobs/{job}").json()["status"] == "succeeded", 60,
             "the job queued before the outage did not finish after it")
    assert "guardrail_store_up 1.0" in client.get("/metrics").text


def test_a_spool_that_cannot_be_written_is_503(engine, tmp_path, job_db, clip):
    """The upload spool is part of the store: a folder that cannot be created is 503 too."""
    settings = ServiceSettings(host="127.0.0.1", frames=2, sampling=serve_fixtures.UNIFORM,
                               jobs=Jobs(db_url=job_db, spool_dir=str(tmp_path / "spool")))
    app = create_app(LocalJudge(engine), settings)
    with TestClient(app) as client:
        spool = tmp_path / "spool"
        for f in spool.iterdir():
            if f.is_dir():
                os.rmdir(f)
        (spool / f"uploads-{os.getpid()}").write_bytes(b"")     # a file where a folder goes
        _unavailable(client.post("/v1/moderate", files={"file": ("v.mp4", clip, "video/mp4")}))
