"""The job store: a job accepted is never lost. On SQLite (embedded default) or PostgreSQL
(clusters), see `store.py`.

A job is written (its upload spooled to a file first, then its row) before the client hears its
id. Runners *claim* jobs with a lease they renew while working; a job whose lease ran out (its
runner died, the service restarted) is claimed again, up to `max_attempts` runs. Webhook
deliveries are rows in the same table with their own retry schedule, so they resume too.
Every method is blocking and short: call them with `asyncio.to_thread`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from guardrail.serve.store import open_database

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,                 -- queued | running | succeeded | failed
    request TEXT NOT NULL,                -- JSON: options, policy set, source
    input_path TEXT,                      -- spooled upload (SQLite), removed when the job ends
    verdict TEXT, error TEXT,             -- JSON
    owner TEXT, lease_until FLOAT, attempts INTEGER NOT NULL DEFAULT 0,
    webhook_url TEXT, webhook_state TEXT, -- NULL | pending | delivered | failed
    webhook_attempts INTEGER NOT NULL DEFAULT 0, webhook_due FLOAT,
    created_at FLOAT NOT NULL, updated_at FLOAT NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, created_at)",
    "CREATE INDEX IF NOT EXISTS jobs_webhook ON jobs (webhook_state, webhook_due)",
    # job inputs where the database holds them (PostgreSQL: any node runs any job)
    "CREATE TABLE IF NOT EXISTS job_inputs (id TEXT PRIMARY KEY, data BYTES NOT NULL)",
    # registered policy set versions (PUT /v1/policies/{name}); every replica reads them
    """CREATE TABLE IF NOT EXISTS policy_versions (
    name TEXT NOT NULL, version INTEGER NOT NULL, hash TEXT NOT NULL, yaml TEXT NOT NULL,
    created_at FLOAT NOT NULL, PRIMARY KEY (name, version)
)""",
]
# columns added after the first release: (name, DDL type), added to older databases at start
_ADDED = [("tenant", "TEXT")]
ENDED = ("succeeded", "failed")
STALE_S = 3600.0     # a spool file this old that no job claims is left over, whoever wrote it


@dataclass(frozen=True)
class Job:
    id: str
    status: str
    request: dict
    input_path: str | None
    verdict: dict | None
    error: dict | None
    attempts: int
    webhook_url: str | None
    webhook_state: str | None
    webhook_attempts: int
    created_at: float
    updated_at: float
    tenant: str | None = None       # the API key id that created it (None without keys)

    @staticmethod
    def iso(ts: float) -> str:
        return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


class JobStore:
    """Jobs on a database (`db`: a path, `sqlite:///path` or `postgresql://...`), uploaded
    inputs in `spool_dir` (SQLite) or in the database (PostgreSQL, with local copies of the
    inputs of the jobs this machine runs in `spool_dir`). Replicas of one store may share the
    spool folder; a file in it is removed once its job ends."""

    def __init__(self, db: str | os.PathLike, spool_dir: str | os.PathLike):
        self.db = open_database(os.fspath(db))
        self.spool = Path(spool_dir)
        self.spool.mkdir(parents=True, exist_ok=True)
        self.db.execute_schema(_SCHEMA)
        have = self.db.columns("jobs")
        missing = [f"ALTER TABLE jobs ADD COLUMN {n} {t}" for n, t in _ADDED if n not in have]
        if missing:
            self.db.execute_schema(missing)
        self._clean_spool()

    def _tx(self, write: bool = True):
        return self.db.tx(write)

    def _clean_spool(self) -> None:
        """Remove what a crash or a stop left in the spool: inputs and copies of jobs that
        ended (or that no row names, once they are old), `.part` files of dead writers, the
        upload folders of dead processes. Safe beside live replicas sharing the folder: a file
        of a queued or running job is kept, and so is anything another process may be writing.
        """
        # NOTE: listed before the statuses are read, so a file listed belongs to a job that
        # is already written (or to an upload between its file and its row: young, kept).
        entries = list(self.spool.iterdir())
        status = self._statuses([f.name for f in entries if f.is_file() and f.suffix != ".part"])
        old = time.time() - STALE_S
        for f in entries:
            if f.is_dir():
                if f.name.startswith("uploads-") and not _alive(f.name[8:]):
                    shutil.rmtree(f, ignore_errors=True)   # a dead process's uploads
                continue
            with suppress(FileNotFoundError):
                if f.suffix == ".part":
                    stale = not _alive(_writer(f.name)) or f.stat().st_mtime < old
                else:
                    stale = status.get(f.name) in ENDED or (
                        f.name not in status and f.stat().st_mtime < old)
                if stale:
                    f.unlink()

    def _statuses(self, ids: list[str]) -> dict[str, str]:
        """The status of each of these jobs that the store knows."""
        found: dict[str, str] = {}
        with self._tx(write=False) as db:
            for i in range(0, len(ids), 500):
                part = ids[i:i + 500]
                rows = db.execute(f"SELECT id, status FROM jobs WHERE id IN "
                                  f"({', '.join('?' * len(part))})", tuple(part)).fetchall()
                found.update((r["id"], r["status"]) for r in rows)
        return found

    def _drop_copy(self, job_id: str) -> None:
        """Remove this machine's copy of a job's input (PostgreSQL; the database keeps it)."""
        assert self.db.inputs_in_db, "on SQLite the spool file is the input itself"
        with suppress(FileNotFoundError):
            os.unlink(self.spool / job_id)

    # --- jobs ---------------------------------------------------------------------------------

    def create(self, request: dict, data: bytes | None, webhook_url: str | None,
               tenant: str | None = None, upload: str | None = None) -> Job:
        """A queued job. Its input: `data`, or the file `upload` (moved into the store)."""
        job_id = "job-" + uuid.uuid4().hex
        input_path = None
        if upload is not None and self.db.inputs_in_db:
            data = Path(upload).read_bytes()
        elif upload is not None:
            input_path = str(self.spool / job_id)
            _move_durably(upload, input_path)
        if data is not None and not self.db.inputs_in_db:
            input_path = str(self.spool / job_id)
            _write_durably(input_path, data)
        now = time.time()
        with self._tx() as db:
            if data is not None and self.db.inputs_in_db:
                db.execute("INSERT INTO job_inputs (id, data) VALUES (?, ?)", (job_id, data))
            db.execute("INSERT INTO jobs (id, status, request, input_path, webhook_url, "
                       "tenant, created_at, updated_at) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?)",
                       (job_id, json.dumps(request), input_path, webhook_url, tenant, now, now))
        job = self.get(job_id)
        assert job is not None, "a job just written is readable"
        return job

    def get(self, job_id: str) -> Job | None:
        with self._tx(write=False) as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def claim(self, owner: str, lease_s: float, max_attempts: int) -> Job | None:
        """The oldest queued job, or a running one whose lease ran out; marked running."""
        now = time.time()
        with self._tx() as db:
            while True:
                row = db.execute(
                    "SELECT * FROM jobs WHERE status = 'queued' OR (status = 'running' AND "
                    "lease_until < ?) ORDER BY created_at LIMIT 1" + self.db.lock,
                    (now,)).fetchone()
                if row is None:
                    return None
                if row["attempts"] >= max_attempts:
                    error = {"type": "job_failed",
                             "message": f"gave up after {row['attempts']} attempts"}
                    self._end(db, row["id"], None, error, now)
                    continue
                db.execute("UPDATE jobs SET status = 'running', owner = ?, lease_until = ?, "
                           "attempts = attempts + 1, updated_at = ? WHERE id = ?",
                           (owner, now + lease_s, now, row["id"]))
                return _job(db.execute("SELECT * FROM jobs WHERE id = ?",
                                       (row["id"],)).fetchone())

    def renew(self, job_id: str, owner: str, lease_s: float) -> bool:
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET lease_until = ? WHERE id = ? AND owner = ? AND "
                             "status = 'running'", (time.time() + lease_s, job_id, owner))
        return cur.rowcount == 1

    def release(self, job_id: str, owner: str, count_attempt: bool = False) -> None:
        """Back to queued (shutdown, or a full engine): another run picks it up, here or on
        another node, so the local copy of its input (PostgreSQL) goes."""
        undo = 0 if count_attempt else 1
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET status = 'queued', owner = NULL, lease_until = "
                             "NULL, attempts = attempts - ?, updated_at = ? WHERE id = ? AND "
                             "owner = ? AND status = 'running'",
                             (undo, time.time(), job_id, owner))
            if cur.rowcount == 1 and self.db.inputs_in_db:
                self._drop_copy(job_id)    # before the commit: the job is still only ours

    def finish(self, job_id: str, owner: str, verdict: dict | None, error: dict | None) -> bool:
        """Record the result if this runner still holds the job; False if it lost it."""
        with self._tx() as db:
            row = db.execute("SELECT owner, status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["owner"] != owner or row["status"] != "running":
                if self.db.inputs_in_db and (row is None or row["status"] in ENDED):
                    self._drop_copy(job_id)  # it ended elsewhere (its lease ran out here)
                return False
            self._end(db, job_id, verdict, error, time.time())
        return True

    def _end(self, db, job_id: str, verdict: dict | None, error: dict | None, now: float):
        row = db.execute("SELECT input_path, webhook_url FROM jobs WHERE id = ?",
                         (job_id,)).fetchone()
        db.execute("UPDATE jobs SET status = ?, verdict = ?, error = ?, owner = NULL, "
                   "lease_until = NULL, updated_at = ?, webhook_state = ?, webhook_due = ? "
                   "WHERE id = ?",
                   ("failed" if error else "succeeded", _dump(verdict), _dump(error), now,
                    "pending" if row["webhook_url"] else None, now, job_id))
        if self.db.inputs_in_db:
            db.execute("DELETE FROM job_inputs WHERE id = ?", (job_id,))
        for path in (row["input_path"], str(self.spool / job_id)):
            if path:
                with suppress(FileNotFoundError):
                    os.unlink(path)

    def input_file(self, job: Job) -> str | None:
        """A local file holding the job's upload (fetched from the database where it lives
        there), or None for a job that names its video by reference."""
        if not self.db.inputs_in_db:
            return job.input_path
        local = self.spool / job.id
        if not local.exists():
            with self._tx(write=False) as db:
                row = db.execute("SELECT data FROM job_inputs WHERE id = ?",
                                 (job.id,)).fetchone()
            if row is None:
                return None
            _write_durably(str(local), bytes(row["data"]))
        return str(local)

    def counts(self) -> dict[str, int]:
        with self._tx(write=False) as db:
            rows = db.execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status").fetchall()
        return {r["status"]: r["n"] for r in rows}

    # --- policy versions ----------------------------------------------------------------

    def add_policy(self, name: str, version: int, digest: str, yaml_text: str) -> int | None:
        """Store a new version; None when it is not greater than the latest (returned
        otherwise as the new latest). Atomic and in order: concurrent PUTs of one name run one
        after the other, so two replicas cannot both add version n, and versions only grow."""
        with self._tx() as db:
            self.db.serialize(db, f"policy_versions:{name}")
            row = db.execute("SELECT MAX(version) AS v FROM policy_versions WHERE name = ?",
                             (name,)).fetchone()
            latest = row["v"] if row and row["v"] is not None else 0
            if version <= latest:
                return None
            db.execute("INSERT INTO policy_versions (name, version, hash, yaml, created_at) "
                       "VALUES (?, ?, ?, ?, ?)", (name, version, digest, yaml_text, time.time()))
        return version

    def policy(self, name: str, version: int | None = None) -> dict | None:
        """A stored version (the latest when `version` is None): name, version, hash, yaml,
        created_at."""
        with self._tx(write=False) as db:
            if version is None:
                row = db.execute("SELECT * FROM policy_versions WHERE name = ? ORDER BY "
                                 "version DESC LIMIT 1", (name,)).fetchone()
            else:
                row = db.execute("SELECT * FROM policy_versions WHERE name = ? AND version = ?",
                                 (name, version)).fetchone()
        return dict(row) if row else None

    def policy_names(self) -> list[str]:
        with self._tx(write=False) as db:
            rows = db.execute("SELECT DISTINCT name FROM policy_versions ORDER BY name").fetchall()
        return [r["name"] for r in rows]

    def policy_versions(self, name: str) -> list[dict]:
        with self._tx(write=False) as db:
            rows = db.execute("SELECT version, hash, created_at FROM policy_versions WHERE "
                              "name = ? ORDER BY version", (name,)).fetchall()
        return [dict(r) for r in rows]

    # --- webhooks -------------------------------------------------------------------------

    def claim_webhook(self, lease_s: float) -> Job | None:
        """A pending delivery that is due; pushed `lease_s` into the future while it is tried."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE webhook_state = 'pending' AND "
                             "webhook_due <= ? ORDER BY webhook_due LIMIT 1" + self.db.lock,
                             (now,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET webhook_due = ?, webhook_attempts = webhook_attempts + 1"
                       " WHERE id = ?", (now + lease_s, row["id"]))
            return _job(db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone())

    def webhook_result(self, job_id: str, state: str, retry_in_s: float = 0.0) -> None:
        """`delivered`, `failed` (for good), or `pending` again after `retry_in_s`."""
        assert state in ("delivered", "failed", "pending"), state
        with self._tx() as db:
            db.execute("UPDATE jobs SET webhook_state = ?, webhook_due = ? WHERE id = ?",
                       (state, time.time() + retry_in_s, job_id))


def _job(row) -> Job:
    return Job(id=row["id"], status=row["status"], request=json.loads(row["request"]),
               input_path=row["input_path"], verdict=_load(row["verdict"]),
               error=_load(row["error"]), attempts=row["attempts"],
               webhook_url=row["webhook_url"], webhook_state=row["webhook_state"],
               webhook_attempts=row["webhook_attempts"], created_at=row["created_at"],
               updated_at=row["updated_at"], tenant=row["tenant"])


def _dump(value: dict | None) -> str | None:
    return None if value is None else json.dumps(value)


def _load(text: str | None) -> dict | None:
    return None if text is None else json.loads(text)


def _move_durably(src: str, path: str) -> None:
    tmp = _part(path)
    shutil.move(src, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_durably(path: str, data: bytes) -> None:
    tmp = _part(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _part(path: str) -> str:
    """A file to write `path` into, this writer's own (replicas may fetch one job's copy at
    once): `<path>.<pid>-<random>.part`."""
    return f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.part"


def _writer(part_name: str) -> str:
    """The pid in a `_part` name ('' for a name without one)."""
    middle = part_name.removesuffix(".part").rpartition(".")[2]
    return middle.partition("-")[0]


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True
