"""`predictions.jsonl` and `failed.jsonl`: written line by line as videos finish, read back
tolerantly (a run killed mid-write leaves a truncated last line), and joined with a dataset into
the rows that `metrics.evaluate` scores.

A predictions line is one verdict plus `video_path` (as the dataset names the video) and
`labels` (category ids, benign = []). A failed line is `{"video_path", "labels", "error":
{"type", "message"}}`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from guardrail.bench.datasets import Dataset, Item
from guardrail.bench.metrics import EvalSet
from guardrail.errors import UsageError
from guardrail.verdict import Verdict

PREDICTIONS = "predictions.jsonl"
FAILED = "failed.jsonl"
EXTRA_KEYS = ("video_path", "labels")


@dataclass(frozen=True)
class Prediction:
    video_path: str
    labels: tuple[str, ...]
    verdict: Verdict

    def line(self) -> dict:
        return {**self.verdict.model_dump(mode="json"), "video_path": self.video_path,
                "labels": list(self.labels)}


class LineWriter:
    """Appends JSON lines; every line is flushed and fsynced before `write` returns, so a killed
    run loses at most the line being written."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, obj: Mapping) -> None:
        self.file.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> LineWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def repair_tail(path: Path) -> int:
    """Cut a truncated last line (no trailing newline) off `path`. Returns bytes removed."""
    if not path.is_file():
        return 0
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    with open(path, "r+b") as f:
        f.truncate(keep)
    return len(data) - keep


def _json_lines(path: Path) -> tuple[list[dict], int]:
    """Parsed object lines and the count of unreadable ones (a partial last line included)."""
    if not path.is_file():
        return [], 0
    rows, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(obj, dict) and isinstance(obj.get("video_path"), str):
            rows.append(obj)
        else:
            bad += 1
    return rows, bad


def read_predictions(path: str | os.PathLike) -> tuple[dict[str, Prediction], int]:
    """Predictions by video_path (a later line for the same video wins) and the number of lines
    that were skipped because they are not a valid prediction."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such predictions file")
    rows, bad = _json_lines(path)
    out: dict[str, Prediction] = {}
    for row in rows:
        verdict = {k: v for k, v in row.items() if k not in EXTRA_KEYS}
        try:
            out[row["video_path"]] = Prediction(row["video_path"],
                                                tuple(row.get("labels") or ()),
                                                Verdict.model_validate(verdict))
        except ValidationError:
            bad += 1
    return out, bad


def read_failures(path: str | os.PathLike) -> dict[str, dict]:
    """Recorded failures by video_path (the latest wins); {} when there is no file."""
    rows, _ = _json_lines(Path(path))
    return {row["video_path"]: row for row in rows}


def join(predictions: Mapping[str, Prediction], dataset: Dataset | None
         ) -> tuple[EvalSet, list[Item]]:
    """The rows to score, one per dataset entry with a prediction, and the entries without one.
    Without a dataset, every prediction is a row (labels from the file; subcategory = the first
    label, or `benign`)."""
    items = list(dataset.items) if dataset is not None else [
        Item(p.video_path, Path(p.video_path), p.labels,
             p.labels[0].lower() if p.labels else "benign", None, "", not p.labels)
        for p in predictions.values()]
    rows = [(item, predictions[item.video_path]) for item in items
            if item.video_path in predictions]
    missing = [item for item in items if item.video_path not in predictions]
    ids = _category_ids(p for _, p in rows) if rows else _category_ids(predictions.values())
    scores = np.array([[c.score for c in p.verdict.categories] for _, p in rows],
                      dtype=np.float64).reshape(len(rows), len(ids))
    return EvalSet(
        category_ids=ids,
        labels=tuple(item.labels for item, _ in rows),
        flagged=tuple(tuple(p.verdict.flagged_ids()) for _, p in rows),
        scores=scores,
        category=tuple(item.category for item, _ in rows),
        subcategory=tuple(item.subcategory for item, _ in rows),
        benign=np.array([item.benign for item, _ in rows], dtype=bool),
    ), missing


def _category_ids(predictions) -> tuple[str, ...]:
    ids: tuple[str, ...] | None = None
    for p in predictions:
        mine = tuple(c.id for c in p.verdict.categories)
        if ids is None:
            ids = mine
        elif mine != ids:
            raise UsageError(f"{p.video_path}: categories {list(mine)} differ from {list(ids)}; "
                             "one predictions file must use one policy set")
    return ids or ()
