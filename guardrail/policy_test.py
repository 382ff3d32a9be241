"""`guardrail policy test`: a policy set judged on labelled example videos (bench's JSONL
manifest, `labels` = the category ids that apply), per example expected vs flagged, per category
precision and recall, and with a second set which examples change verdict. Both sets share one
engine (the model loads once) and its chunk cache: under `--layout parallel_cached` the
categories the two versions have in common are encoded once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from guardrail.bench.datasets import Dataset
from guardrail.bench.runner import groups, judge_group
from guardrail.engine import GuardEngine
from guardrail.policy import PolicySet


def flagged(engine: GuardEngine, dataset: Dataset,
            on_video: Callable[[], None] | None = None) -> dict[str, list[str] | dict]:
    """video_path -> flagged category ids, or {"error": message} for a video that cannot be
    read. Videos go through the engine `batch_size` at a time, as `bench run` sends them."""
    out: dict[str, list[str] | dict] = {}
    for group in groups(dataset.videos(), engine.config.batch_size):
        for outcome in judge_group(engine, group):
            out[outcome.video_path] = (
                [c["id"] for c in outcome.verdict["categories"] if c["flagged"]]
                if outcome.verdict is not None else {"error": outcome.error["message"]})
            if on_video:
                on_video()
    return out


def per_category(policies: PolicySet, dataset: Dataset, got: dict) -> dict[str, dict]:
    """Per category: true/false positives, false negatives, precision and recall (None where
    undefined), over the examples that were judged."""
    out = {}
    for c in policies.categories:
        tp = fp = fn = 0
        for item in dataset.videos():
            ids = got.get(item.video_path)
            if not isinstance(ids, list):
                continue
            want, have = c.id in item.labels, c.id in ids
            tp, fp, fn = tp + (want and have), fp + (have and not want), fn + (want and not have)
        out[c.id] = {"tp": tp, "fp": fp, "fn": fn,
                     "precision": tp / (tp + fp) if tp + fp else None,
                     "recall": tp / (tp + fn) if tp + fn else None}
    return out


def report(engine: GuardEngine, policies: PolicySet, dataset: Dataset,
           against: PolicySet | None = None, on_video: Callable[[], None] | None = None
           ) -> dict[str, Any]:
    """The `policy test` report (the shape of its `--json`)."""
    now = flagged(engine.with_policies(policies), dataset, on_video)
    examples = [{"video": i.video_path, "labels": list(i.labels),
                 "flagged_ids": now[i.video_path] if isinstance(now[i.video_path], list)
                 else None, **({"error": now[i.video_path]["error"]}
                               if isinstance(now[i.video_path], dict) else {})}
                for i in dataset.videos()]
    out: dict[str, Any] = {"examples": examples,
                           "per_category": per_category(policies, dataset, now),
                           "warnings": list(engine.warnings)}
    if against is not None:
        before = flagged(engine.with_policies(against), dataset, on_video)
        out["changed"] = [{"video": v, "before": before[v], "after": now[v]}
                          for v in now if isinstance(now[v], list)
                          and isinstance(before.get(v), list) and set(before[v]) != set(now[v])]
    return out
