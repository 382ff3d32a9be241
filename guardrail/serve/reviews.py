"""Review items: what the service judged, kept for a person to confirm or overturn.

Each item holds the verdict and JPEG thumbnails of the frames the model saw, per window; a
reviewer's decision (the true labels, a note) is stored with it, and every earlier decision stays
in its history. Items live in the job store's database (SQLite or PostgreSQL), so every ingress
replica on any node sees the same queue. At most `max_items` are kept: when a new one arrives
the oldest reviewed items go first, then the oldest pending ones.

Every method is blocking and short: call them with `asyncio.to_thread`.
"""

from __future__ import annotations

import base64
import io
import json
import time
import uuid
from dataclasses import dataclass, replace

import numpy as np

from guardrail.serve.store import Database
from guardrail.verdict import Verdict
from guardrail.video import Video

THUMB_SIDE = 256          # longest side of a thumbnail, pixels
THUMB_QUALITY = 80        # JPEG quality

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS review_items (
    id TEXT PRIMARY KEY,
    created_at FLOAT NOT NULL,
    status TEXT NOT NULL,                 -- pending | reviewed
    flagged INTEGER NOT NULL,             -- the model's verdict: 1 flagged, 0 not
    policy_set TEXT NOT NULL,
    verdict TEXT NOT NULL,                -- JSON
    frames TEXT NOT NULL,                 -- JSON: [{"window", "k", "t_s"}]
    source TEXT NOT NULL,                 -- "moderate" or the job id
    tenant TEXT,                          -- the API key id that asked (None without keys)
    labels TEXT, note TEXT, reviewer TEXT, reviewed_at FLOAT   -- the current decision
)""",
    "CREATE INDEX IF NOT EXISTS review_queue ON review_items (created_at, id)",
    "CREATE INDEX IF NOT EXISTS review_status ON review_items (status, created_at)",
    "CREATE TABLE IF NOT EXISTS review_frames (item TEXT NOT NULL, k INTEGER NOT NULL, "
    "jpeg BYTES NOT NULL, PRIMARY KEY (item, k))",
    # the categories the model flagged, one row each (the queue's category filter)
    "CREATE TABLE IF NOT EXISTS review_flags (item TEXT NOT NULL, category TEXT NOT NULL, "
    "PRIMARY KEY (category, item))",
    "CREATE INDEX IF NOT EXISTS review_flags_item ON review_flags (item)",
    """CREATE TABLE IF NOT EXISTS review_history (
    item TEXT NOT NULL, labels TEXT NOT NULL, note TEXT NOT NULL, reviewer TEXT,
    reviewed_at FLOAT NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS review_history_item ON review_history (item, reviewed_at)",
]


@dataclass(frozen=True)
class Frame:
    window: int         # index of the window (verdict.segments[window])
    k: int              # index of the frame within the item (GET .../frames/{k})
    t_s: float          # seconds from the start of the video


@dataclass(frozen=True)
class Decision:
    labels: list[str]
    note: str
    reviewer: str | None
    reviewed_at: float


@dataclass(frozen=True)
class Item:
    id: str
    created_at: float
    status: str
    flagged: bool
    policy_set: str
    verdict: dict
    frames: list[Frame]
    source: str
    tenant: str | None
    review: Decision | None


@dataclass(frozen=True)
class Query:
    """Filters of the queue; None = any."""

    status: str | None = None         # pending | reviewed
    flagged: bool | None = None
    category: str | None = None       # the model flagged this category id
    policy_set: str | None = None
    tenant: str | None = None         # only this tenant's items (None: every item)


def thumbnails(video: Video, max_frames: int) -> tuple[list[Frame], list[bytes]]:
    """JPEG thumbnails (longest side <= 256 px) of the frames the model saw, window by window;
    at most `max_frames`, spread evenly over the video when it had more."""
    from PIL import Image

    seen = [(w, frame, t) for w, clip in enumerate(video.clips)
            for frame, t in zip(clip.frames, clip.window.timestamps_s, strict=True)]
    if len(seen) > max_frames:
        picks = np.linspace(0, len(seen) - 1, max_frames).round().astype(int)
        seen = [seen[i] for i in sorted(set(picks.tolist()))]
    frames, jpegs = [], []
    for k, (window, pixels, t) in enumerate(seen):
        image = Image.fromarray(np.ascontiguousarray(pixels))
        image.thumbnail((THUMB_SIDE, THUMB_SIDE))
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=THUMB_QUALITY)
        frames.append(Frame(window=window, k=k, t_s=round(float(t), 3)))
        jpegs.append(out.getvalue())
    return frames, jpegs


class ReviewStore:
    def __init__(self, db: Database, max_items: int):
        self.db = db
        self.max_items = max_items
        db.execute_schema(_SCHEMA)

    def record(self, verdict: Verdict, frames: list[Frame], jpegs: list[bytes], source: str,
               tenant: str | None) -> str:
        """Store a verdict for review; returns the item id. A job's item is named after the
        job, so a job that runs again replaces its item. Evicts down to `max_items`."""
        item_id = "rev-" + (source.removeprefix("job-") if source.startswith("job-")
                            else uuid.uuid4().hex)
        with self.db.tx() as db:
            _delete(db, item_id)      # a job run again: its earlier run's item and decisions
            db.execute(
                "INSERT INTO review_items (id, created_at, status, flagged, policy_set, "
                "verdict, frames, source, tenant) VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, ?)",
                (item_id, time.time(), int(verdict.flagged), verdict.policy_set,
                 verdict.model_dump_json(), json.dumps([f.__dict__ for f in frames]), source,
                 tenant))
            for category in verdict.flagged_ids():
                db.execute("INSERT INTO review_flags (item, category) VALUES (?, ?)",
                           (item_id, category))
            for f, jpeg in zip(frames, jpegs, strict=True):
                db.execute("INSERT INTO review_frames (item, k, jpeg) VALUES (?, ?, ?)",
                           (item_id, f.k, jpeg))
            self._evict(db)
        return item_id

    def _evict(self, db) -> None:
        n = db.execute("SELECT COUNT(*) AS n FROM review_items").fetchone()["n"]
        if n <= self.max_items:
            return
        # oldest reviewed first, then oldest pending
        rows = db.execute("SELECT id FROM review_items ORDER BY "
                          "CASE WHEN status = 'reviewed' THEN 0 ELSE 1 END, created_at, id "
                          "LIMIT ?", (n - self.max_items,)).fetchall()
        for r in rows:
            _delete(db, r["id"])

    def get(self, item_id: str) -> Item | None:
        with self.db.tx(write=False) as db:
            row = db.execute("SELECT * FROM review_items WHERE id = ?", (item_id,)).fetchone()
        return _item(row) if row else None

    def frame(self, item_id: str, k: int) -> bytes | None:
        with self.db.tx(write=False) as db:
            row = db.execute("SELECT jpeg FROM review_frames WHERE item = ? AND k = ?",
                             (item_id, k)).fetchone()
        return bytes(row["jpeg"]) if row else None

    def history(self, item_id: str) -> list[Decision]:
        """Every decision on the item, oldest first (the last one is the current review)."""
        with self.db.tx(write=False) as db:
            rows = db.execute("SELECT * FROM review_history WHERE item = ? ORDER BY "
                              "reviewed_at", (item_id,)).fetchall()
        return [Decision(json.loads(r["labels"]), r["note"], r["reviewer"], r["reviewed_at"])
                for r in rows]

    def decide(self, item_id: str, labels: list[str], note: str,
               reviewer: str | None) -> Item | None:
        """Record a decision (it replaces the current one; both stay in the history). None
        when there is no such item."""
        with self.db.tx() as db:
            # the UPDATE locks the row (two reviewers saving at once: one after the other)
            cur = db.execute("UPDATE review_items SET status = 'reviewed' WHERE id = ?",
                             (item_id,))
            if cur.rowcount == 0:
                return None                              # no such item, or just evicted
            now = time.time()          # under the row lock: history order is decision order
            db.execute("UPDATE review_items SET labels = ?, note = ?, reviewer = ?, "
                       "reviewed_at = ? WHERE id = ?",
                       (json.dumps(labels), note, reviewer, now, item_id))
            db.execute("INSERT INTO review_history (item, labels, note, reviewer, reviewed_at) "
                       "VALUES (?, ?, ?, ?, ?)", (item_id, json.dumps(labels), note, reviewer,
                                                  now))
        return self.get(item_id)

    def list(self, query: Query, limit: int, cursor: str | None = None
             ) -> tuple[list[Item], str | None]:
        """Items newest first, and the cursor of the next page (None at the end)."""
        where, params = _where(query)
        if cursor is not None:
            created, last = _cursor(cursor)
            where.append("(created_at < ? OR (created_at = ? AND id < ?))")
            params += [created, created, last]
        sql = ("SELECT * FROM review_items" + _clause(where)
               + " ORDER BY created_at DESC, id DESC LIMIT ?")
        with self.db.tx(write=False) as db:
            rows = db.execute(sql, (*params, limit + 1)).fetchall()
        items = [_item(r) for r in rows[:limit]]
        more = len(rows) > limit
        return items, (_next(items[-1]) if more and items else None)

    def reviewed(self, query: Query) -> list[Item]:
        """Every reviewed item that matches, oldest first (for the export)."""
        where, params = _where(replace(query, status="reviewed"))
        with self.db.tx(write=False) as db:
            rows = db.execute("SELECT * FROM review_items" + _clause(where)
                              + " ORDER BY created_at, id", tuple(params)).fetchall()
        return [_item(r) for r in rows]

    def facets(self, tenant: str | None = None) -> tuple[list[str], list[str]]:
        """The policy sets of the stored items and the categories the model flagged in them
        (the queue's filter choices), each sorted; only `tenant`'s items unless None."""
        where, params = _where(Query(tenant=tenant))
        cond = _clause(where)
        with self.db.tx(write=False) as db:
            sets = db.execute("SELECT DISTINCT policy_set FROM review_items" + cond
                              + " ORDER BY policy_set", tuple(params)).fetchall()
            cats = db.execute("SELECT DISTINCT category FROM review_flags WHERE item IN "
                              "(SELECT id FROM review_items" + cond + ") ORDER BY category",
                              tuple(params)).fetchall()
        return [r["policy_set"] for r in sets], [r["category"] for r in cats]


def _where(q: Query) -> tuple[list[str], list]:
    where: list[str] = []
    params: list = []
    for column, value in (("status", q.status), ("policy_set", q.policy_set),
                          ("tenant", q.tenant)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if q.flagged is not None:
        where.append("flagged = ?")
        params.append(int(q.flagged))
    if q.category is not None:
        where.append("id IN (SELECT item FROM review_flags WHERE category = ?)")
        params.append(q.category)
    return where, params


def _clause(where: list[str]) -> str:
    return " WHERE " + " AND ".join(where) if where else ""


def _delete(db, item_id: str) -> None:
    """An item and everything stored with it; the item row first (it takes the row lock a
    concurrent decision holds, so no decision lands after its history is gone)."""
    for table, key in (("review_items", "id"), ("review_flags", "item"),
                       ("review_frames", "item"), ("review_history", "item")):
        db.execute(f"DELETE FROM {table} WHERE {key} = ?", (item_id,))


def _next(item: Item) -> str:
    raw = json.dumps([item.created_at, item.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _cursor(text: str) -> tuple[float, str]:
    """The position a cursor names; ValueError when it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        created, last = json.loads(raw)
        if isinstance(created, int | float) and isinstance(last, str):
            return float(created), last
    except (ValueError, TypeError, OverflowError):
        pass
    raise ValueError("not a cursor from this API")


def _item(row) -> Item:
    review = None
    if row["status"] == "reviewed":
        review = Decision(json.loads(row["labels"]), row["note"], row["reviewer"],
                          row["reviewed_at"])
    return Item(id=row["id"], created_at=row["created_at"], status=row["status"],
                flagged=bool(row["flagged"]), policy_set=row["policy_set"],
                verdict=json.loads(row["verdict"]),
                frames=[Frame(**f) for f in json.loads(row["frames"])], source=row["source"],
                tenant=row["tenant"], review=review)
