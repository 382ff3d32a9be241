"""The databases a job store runs on: SQLite (embedded, the default) and PostgreSQL (for
clusters: every ingress replica on any node shares it). One SQL text serves both; a backend
says how to connect, how a transaction that claims rows is opened, its placeholders and column
types, and where job inputs live (SQLite: spool files beside the database; PostgreSQL: a table,
so a job uploaded on one node runs on any other).

    db = open_database("sqlite:///var/lib/guardrail/jobs.sqlite")
    db = open_database("postgresql://guardrail@db.internal/guardrail")
"""

from __future__ import annotations

import os
import re
import select
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager, suppress
from pathlib import Path
from typing import Any, Protocol

from guardrail.errors import UsageError
from guardrail.serve.errors import StoreUnavailable

FAULT_MEMORY_S = 10.0     # a failed write keeps the store reported unavailable this long


class Database(Protocol):
    url: str
    lock: str                   # appended to a SELECT whose rows the transaction will update
    inputs_in_db: bool          # job inputs stored in the database (else spool files)

    def tx(self, write: bool = True) -> Any:
        """Context manager: a connection inside one transaction (committed on success)."""

    def serialize(self, conn: Any, key: str) -> None:
        """Make transactions that call this with the same `key` run one after the other (until
        this one ends)."""

    def execute_schema(self, statements: list[str]) -> None:
        ...

    def columns(self, table: str) -> set[str]:
        ...

    def ping(self) -> None:
        """Raise StoreUnavailable when the store cannot be read, or a write failed within
        the last FAULT_MEMORY_S seconds (a full disk or a read-only file still reads)."""


class _Faults:
    """Turns the driver's "cannot reach / cannot write" errors into StoreUnavailable (503
    with Retry-After), and remembers when the last one happened for `ping`. Errors of the
    caller's own making (a constraint, bad SQL) pass through unchanged."""

    def __init__(self, transient: tuple[type[BaseException], ...]):
        self.transient = transient
        self.last: float | None = None

    @contextmanager
    def translated(self, what: str) -> Iterator[None]:
        try:
            yield
        except self.transient as err:
            self.last = time.monotonic()
            detail = " ".join(str(err).split())[:160] or type(err).__name__
            raise StoreUnavailable(f"the job store is unavailable ({what}: {detail}); "
                                   "retry later") from err

    def check(self) -> None:
        if self.last is not None and time.monotonic() - self.last < FAULT_MEMORY_S:
            raise StoreUnavailable("the job store failed a write in the last "
                                   f"{FAULT_MEMORY_S:g} s; retry later")


_TYPES = {"sqlite": {"FLOAT": "REAL", "BYTES": "BLOB"},
          "postgresql": {"FLOAT": "DOUBLE PRECISION", "BYTES": "BYTEA"}}


def schema_for(kind: str, statements: list[str]) -> list[str]:
    """Portable DDL: `FLOAT` and `BYTES` become the backend's types."""
    types = _TYPES[kind]
    return [re.sub(r"\b(FLOAT|BYTES)\b", lambda m: types[m.group(1)], s) for s in statements]


class SQLite:
    lock = ""
    inputs_in_db = False
    kind = "sqlite"

    def __init__(self, path: str, busy_timeout_s: float = 30.0):
        self.path = path
        self.url = f"sqlite:///{path}"
        self.faults = _Faults((sqlite3.OperationalError, OSError))
        self._busy = busy_timeout_s
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with closing(sqlite3.connect(path, timeout=busy_timeout_s)) as db:
            db.execute("PRAGMA journal_mode=WAL")

    @contextmanager
    def tx(self, write: bool = True) -> Iterator[Any]:
        """One connection per call (thread-safe); writes BEGIN IMMEDIATE so claims never race.
        A file that cannot be opened, read or written (locked past the busy timeout, read-only,
        disk full) is StoreUnavailable."""
        with self.faults.translated("write" if write else "read"), closing(sqlite3.connect(
                self.path, timeout=self._busy, isolation_level=None)) as db:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA synchronous=FULL")
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield db
            except BaseException:
                with suppress(sqlite3.Error):     # a failed write may have rolled back
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def ping(self) -> None:
        with self.tx(write=False) as db:
            db.execute("SELECT 1 FROM jobs LIMIT 1").fetchall()
        self.faults.check()

    def serialize(self, conn: Any, key: str) -> None:
        """Nothing to do: BEGIN IMMEDIATE already runs writers one at a time."""

    def execute_schema(self, statements: list[str]) -> None:
        with closing(sqlite3.connect(self.path, timeout=30)) as db:
            for s in schema_for(self.kind, statements):
                db.execute(s)
            db.commit()

    def columns(self, table: str) -> set[str]:
        with closing(sqlite3.connect(self.path, timeout=30)) as db:
            return {r[1] for r in db.execute(f"PRAGMA table_info({table})")}


class _PgConnection:
    """A psycopg connection that takes the store's `?` placeholders."""

    def __init__(self, conn: Any):
        self._conn = conn

    def execute(self, sql: str, params: tuple = ()) -> Any:
        return self._conn.execute(sql.replace("?", "%s"), params)


class Postgres:
    lock = " FOR UPDATE SKIP LOCKED"
    inputs_in_db = True
    kind = "postgresql"

    def __init__(self, url: str, connect_timeout_s: float = 10.0, max_idle: int = 8):
        try:
            import psycopg
            from psycopg.rows import dict_row
        except ImportError:
            raise UsageError("jobs.db_url is PostgreSQL but psycopg is not installed "
                             "(pip install 'guardrail[serve]')") from None
        self.url = url
        self._psycopg, self._rows = psycopg, dict_row
        self.faults = _Faults((psycopg.OperationalError, psycopg.InterfaceError))
        self._timeout = connect_timeout_s
        self._idle: list[Any] = []             # open connections waiting for the next tx
        self._max_idle = max_idle
        self._idle_lock = threading.Lock()
        self.connects = 0                      # connections opened so far (for tests, metrics)
        try:
            self._give(self._connect())        # reachable now; the connection is kept
        except psycopg.Error as err:
            raise UsageError(f"cannot reach the job database {_safe(url)}: "
                             f"{' '.join(str(err).split())[:200]}") from None

    def _connect(self) -> Any:
        """A new connection. No server-side prepared statements: pooled connections live
        long, and another replica's schema change would make a prepared `SELECT *` fail."""
        with self._idle_lock:
            self.connects += 1
        return self._psycopg.connect(self.url, row_factory=self._rows, autocommit=True,
                                     prepare_threshold=None,
                                     connect_timeout=max(1, int(self._timeout)))

    def _take(self) -> Any:
        with self._idle_lock:
            while self._idle:
                conn = self._idle.pop()
                if self._alive(conn):
                    return conn
                conn.close()
        return self._connect()

    @staticmethod
    def _alive(conn: Any) -> bool:
        """Whether an idle connection can be handed out, without a round trip: nothing should
        arrive on an idle connection, so a readable socket means the server ended the session
        (restart, idle timeout, terminate) or sent something unexpected; either way, a fresh
        connection is the safe choice."""
        if conn.closed or conn.broken:
            return False
        try:
            poll = select.poll()         # not select.select: Ray processes have fds past 1023
            poll.register(conn.pgconn.socket, select.POLLIN | select.POLLERR | select.POLLHUP)
            return not poll.poll(0)
        except (OSError, ValueError):
            return False

    def _give(self, conn: Any) -> None:
        idle_ok = conn.info.transaction_status == self._psycopg.pq.TransactionStatus.IDLE
        with self._idle_lock:
            if idle_ok and not conn.closed and len(self._idle) < self._max_idle:
                self._idle.append(conn)
                return
        conn.close()

    @contextmanager
    def tx(self, write: bool = True) -> Iterator[Any]:
        """A pooled connection inside one transaction: committed on success, rolled back on
        error; a connection the server dropped is discarded rather than handed out again. A
        server that cannot be reached, or drops the connection, is StoreUnavailable."""
        with self.faults.translated("write" if write else "read"):
            conn = self._take()
            try:
                with conn.transaction():
                    yield _PgConnection(conn)
            finally:
                self._give(conn)               # closed instead unless idle and healthy

    def serialize(self, conn: Any, key: str) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (key,))

    def execute_schema(self, statements: list[str]) -> None:
        with self.tx() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(7240117)")   # replicas start together
            for s in schema_for(self.kind, statements):
                conn.execute(s)

    def ping(self) -> None:
        with self.tx(write=False) as conn:
            conn.execute("SELECT 1").fetchall()
        self.faults.check()

    def columns(self, table: str) -> set[str]:
        with self.tx(write=False) as conn:
            rows = conn.execute("SELECT column_name FROM information_schema.columns "
                                "WHERE table_name = ?", (table,)).fetchall()
        return {r["column_name"] for r in rows}


def open_database(url: str) -> SQLite | Postgres:
    """`sqlite:///path` (or a plain path) or `postgresql://...`."""
    if url.startswith(("postgresql://", "postgres://")):
        return Postgres(url)
    if url.startswith("sqlite:///"):
        return SQLite(url.removeprefix("sqlite:///") or "guardrail-jobs.sqlite")
    if "://" in url:
        raise UsageError(f"jobs.db_url must be sqlite:///path or postgresql://..., not "
                         f"{_safe(url)}")
    return SQLite(os.fspath(url))


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", url)
