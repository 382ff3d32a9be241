"""Versioned policy sets in the service: PUT registers a new version (admin keys only), it is
used at once by every replica sharing the store and survives a restart, requests may pin a
version, and every verdict names the version and hash that judged it. On SQLite and on a real
PostgreSQL."""

from __future__ import annotations

import time
from pathlib import Path

import serve_fixtures
import yaml
from fastapi.testclient import TestClient

from guardrail.engine import GuardEngine
from guardrail.policy import load_policy, load_policy_text
from guardrail.serve.app import create_app
from guardrail.serve.judge import LocalJudge
from guardrail.serve.registry import FRESH_S
from guardrail.serve.settings import Jobs, ServiceSettings

ROOT = Path(__file__).resolve().parents[1]
ADMIN, USER = {"authorization": "Bearer root"}, {"authorization": "Bearer alice"}


engine, clip = serve_fixtures.engine, serve_fixtures.clip   # shared fixtures
UNIFORM = serve_fixtures.UNIFORM


def app_for(engine, tmp_path, job_db):
    settings = ServiceSettings(host="127.0.0.1", frames=2, sampling=UNIFORM, api_keys=["alice"],
                               admin_keys=["root"],
                               jobs=Jobs(db_url=job_db, spool_dir=str(tmp_path / "spool"),
                                         workers=0))
    return create_app(LocalJudge(engine), settings)


def version2() -> str:
    doc = yaml.safe_load((ROOT / "policies" / "safewatch.yaml").read_text())
    doc["version"] = 2
    doc["categories"][0]["threshold"] = 0.05
    return yaml.safe_dump(doc, sort_keys=False)


def moderate(c, clip, **fields):
    reply = c.post("/v1/moderate", files={"file": ("v.mp4", clip, "video/mp4")},
                   data={k: str(v) for k, v in fields.items()}, headers=USER)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_put_versions_pin_and_restart(engine, tmp_path, clip, job_db):
    text = version2()
    v1 = load_policy(ROOT / "policies" / "safewatch.yaml")
    with TestClient(app_for(engine, tmp_path, job_db)) as c:
        before = moderate(c, clip)
        assert (before["policy_version"], before["policy_hash"]) == (1, v1.content_hash)
        put = c.put("/v1/policies/safewatch", content=text, headers=ADMIN)
        assert put.status_code == 201, put.text
        assert put.json()["version"] == 2
        assert put.json()["hash"] == load_policy_text(text).content_hash
        after = moderate(c, clip)                          # the new version, no restart
        assert after["policy_version"] == 2 and after["categories"][0]["threshold"] == 0.05
        pinned = moderate(c, clip, policy_set="safewatch", policy_version=1)
        assert (pinned["policy_version"], pinned["policy_hash"]) == (1, v1.content_hash)
        assert pinned["categories"] == before["categories"]
        again = c.put("/v1/policies/safewatch", content=text, headers=ADMIN)
        other = c.put("/v1/policies/weapons", content=text, headers=ADMIN)
        invalid = c.put("/v1/policies/safewatch", content="name: safewatch\n", headers=ADMIN)
        user = c.put("/v1/policies/safewatch", content=text, headers=USER)
        anonymous = c.put("/v1/policies/safewatch", content=text)
        assert [r.status_code for r in (again, other, invalid, user, anonymous)] == [
            409, 409, 422, 403, 401]
        missing = c.post("/v1/moderate", files={"file": ("v.mp4", clip, "video/mp4")},
                         data={"policy_set": "safewatch", "policy_version": "7"}, headers=USER)
        assert missing.status_code == 404
    with TestClient(app_for(engine, tmp_path, job_db)) as c:     # restarted
        got = c.get("/v1/policies/safewatch", headers=USER).json()
        assert got["version"] == 2 and got["yaml"] == text
        versions = c.get("/v1/policies/safewatch/versions", headers=USER).json()
        assert [v["version"] for v in versions["versions"]] == [1, 2]
        assert versions["versions"][0]["created_at"] is None     # the file version
        listing = c.get("/v1/policies", headers=USER).json()
        assert {s["name"]: s["version"] for s in listing["policy_sets"]}["safewatch"] == 2
        assert c.get("/v1/policies/nope", headers=USER).status_code == 404


def test_a_new_version_reaches_every_replica_sharing_the_store(engine, tmp_path, clip, job_db):
    with TestClient(app_for(engine, tmp_path, job_db)) as a, \
            TestClient(app_for(engine, tmp_path, job_db)) as b:
        assert moderate(b, clip)["policy_version"] == 1
        assert a.put("/v1/policies/safewatch", content=version2(),
                     headers=ADMIN).status_code == 201
        deadline = time.monotonic() + FRESH_S + 5
        while moderate(b, clip)["policy_version"] != 2:
            assert time.monotonic() < deadline, "replica b never saw version 2"
            time.sleep(0.2)


def test_a_version_too_long_for_the_model_is_refused_at_put(small_context_model, tmp_path,
                                                            job_db):
    small = small_context_model(4096)
    doc = yaml.safe_load((ROOT / "policies" / "safewatch.yaml").read_text())
    doc["version"] = 2
    doc["categories"][0]["blocked"] = ["Footage that shows a very particular thing. " * 40] * 12
    with TestClient(app_for(GuardEngine.from_pretrained(small), tmp_path, job_db)) as c:
        reply = c.put("/v1/policies/safewatch", content=yaml.safe_dump(doc), headers=ADMIN)
        assert reply.status_code == 422, reply.text
        assert "context is 4,096 tokens" in reply.json()["error"]["message"]
        versions = c.get("/v1/policies/safewatch/versions", headers=USER).json()["versions"]
        assert [v["version"] for v in versions] == [1]            # nothing was stored


def test_versions_outside_the_integer_range_and_look_alike_names_are_4xx(engine, tmp_path,
                                                                          clip, job_db):
    """Versions are 1..2^31-1 on both stores (a request's pin and a PUT alike), and a set whose
    category names collide once case and Unicode forms are ignored, or hide zero-width or
    direction characters, is refused: /v1/moderations keys results by name and must never
    merge two categories."""
    huge = {"policy_set": "safewatch", "policy_version": str(2**63)}
    with TestClient(app_for(engine, tmp_path, job_db)) as c:
        for value in (str(2**63), "1" + "0" * 400, str(2**31)):
            reply = c.post("/v1/moderate", files={"file": ("v.mp4", clip, "video/mp4")},
                           data={**huge, "policy_version": value}, headers=USER)
            assert reply.status_code in (400, 422) and "error" in reply.json(), value
        doc = yaml.safe_load(version2())
        doc["version"] = 2**63
        reply = c.put("/v1/policies/safewatch", content=yaml.safe_dump(doc), headers=ADMIN)
        assert reply.status_code == 422 and "version" in reply.json()["error"]["message"]
        for second in ("Weapons", "WEAPONS", "Weap\u200bons", "\u202eWeapons"):
            policy = ("name: twins\nversion: 1\ncategories:\n"
                      "  - {id: A1, name: Weapons, blocked: [guns], threshold: 0.01}\n"
                      f"  - {{id: A2, name: \"{second}\", blocked: [knives], threshold: 0.99}}\n")
            reply = c.post("/v1/moderate", files={"file": ("v.mp4", clip, "video/mp4")},
                           data={"policy": policy}, headers=USER)
            assert reply.status_code == 422, (second, reply.text)
            assert "name" in reply.json()["error"]["message"]
