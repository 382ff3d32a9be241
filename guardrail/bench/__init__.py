"""Offline benchmark: run an engine over a labelled video set, score it, report it.

Stages, in data-flow order: `datasets` (SafeWatch-Bench folders, JSONL manifests) -> `runner`
(verdicts appended to predictions.jsonl, resumable, optionally on Ray) -> `predictions` (read back
and joined with the labels) -> `metrics` (pure math) -> `score` (metrics.json) -> `report`
(report.md + plots) and `compare` (several runs side by side). `command` is `guardrail bench`.
"""
