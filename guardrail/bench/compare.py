"""Several prediction files side by side, scored on the videos they all have, so layouts, keep
ratios and models are compared on the same videos: one row per metric, one column per run."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from guardrail.bench.predictions import read_predictions
from guardrail.bench.score import Scored, run_name

ROWS: tuple[tuple[str, str], ...] = (
    ("model", "settings.model"), ("layout", "settings.layout"), ("mode", "settings.mode"),
    ("keep ratio", "settings.keep_ratio"), ("frames", "settings.frames_used"),
    ("videos", "n_videos"), ("failed", "n_failed"),
    ("SafeWatch ACC", "safewatch.acc"), ("SafeWatch F1", "safewatch.f1"),
    ("SafeWatch AUPRC", "safewatch.auprc"),
    ("micro F1", "micro.f1"), ("macro F1", "macro.f1"),
    ("binary accuracy", "binary.accuracy"), ("binary F1", "binary.f1"),
    ("binary FPR", "binary.fpr"), ("binary AUPRC", "binary.auprc"),
    ("binary AUROC", "binary.auroc"), ("ECE", "calibration.ece"),
    ("videos / s", "throughput.videos_per_s"),
)


def names(files: Sequence[str | os.PathLike]) -> list[str]:
    """Unique column names: `run_name`, suffixed `-2`, `-3` ... on clashes."""
    out: list[str] = []
    for f in files:
        base, name, i = run_name(Path(f)), run_name(Path(f)), 1
        while name in out:
            i += 1
            name = f"{base}-{i}"
        out.append(name)
    return out


def common_videos(files: Sequence[str | os.PathLike]) -> set[str]:
    """Video paths that have a prediction in every file."""
    sets = [set(read_predictions(f)[0]) for f in files]
    return set.intersection(*sets) if sets else set()


def lookup(metrics: dict, dotted: str):
    node = metrics
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def table(runs: Sequence[Scored]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): the fixed rows, then F1 per category (over the union of categories)."""
    header = ["metric", *(r.name for r in runs)]
    rows = [[label, *(cell(lookup(r.metrics, key)) for r in runs)] for label, key in ROWS]
    ids = list(dict.fromkeys(cid for r in runs for cid in r.metrics["per_category"]))
    rows += [[f"F1 {cid}", *(cell(lookup(r.metrics, f"per_category.{cid}.f1")) for r in runs)]
             for cid in ids]
    return header, rows


def to_markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
