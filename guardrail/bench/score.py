"""Score a predictions file against a dataset: `metrics.json` (docs/bench.md) and `report.md`.

Videos of the dataset without a prediction are reported, not fatal: `n_failed` counts them and
`failed` lists them with the error recorded in `failed.jsonl` (or "no prediction"); the metrics
are computed over the videos that have one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from guardrail.bench.datasets import Dataset
from guardrail.bench.metrics import EvalSet, evaluate
from guardrail.bench.predictions import FAILED, Prediction, join, read_failures, read_predictions
from guardrail.bench.runner import read_run
from guardrail.calibration import Calibration, calibrate_verdict

METRICS = "metrics.json"


@dataclass(frozen=True)
class Scored:
    """Everything a report needs about one predictions file."""

    name: str
    metrics: dict
    rows: EvalSet
    predictions: dict[str, Prediction]


def score(predictions_file: str | os.PathLike, dataset: Dataset | None = None,
          calibration: Calibration | None = None, name: str | None = None,
          only: set[str] | None = None) -> Scored:
    """Metrics of one predictions file. `calibration` rescales scores (and re-derives flags)
    first; `only` restricts scoring to these video paths (for side-by-side comparisons)."""
    path = Path(predictions_file)
    preds, bad = read_predictions(path)
    if calibration is not None:
        preds = {k: Prediction(p.video_path, p.labels, calibrate_verdict(p.verdict, calibration))
                 for k, p in preds.items()}
    if only is not None:
        preds = {k: p for k, p in preds.items() if k in only}
    if dataset is not None and only is not None:
        dataset = Dataset(dataset.root, dataset.kind,
                          tuple(i for i in dataset.items if i.video_path in only))
    rows, missing = join(preds, dataset)
    metrics = evaluate(rows)
    failures = read_failures(path.parent / FAILED)
    seen: set[str] = set()
    failed = []
    for item in missing:
        if item.video_path not in seen:
            seen.add(item.video_path)
            error = failures.get(item.video_path, {}).get("error") or {
                "type": "no_prediction", "message": "no prediction for this video"}
            failed.append({"video_path": item.video_path, "error": error})
    # without a dataset, the run's own failure list says what failed (a later success wins)
    for video_path, line in failures.items():
        if (video_path not in seen and video_path not in preds
                and (only is None or video_path in only)):
            seen.add(video_path)
            failed.append({"video_path": video_path, "error": line.get("error")})
    metrics["n_failed"] = len(failed)
    metrics["failed"] = failed
    metrics["n_skipped_lines"] = bad
    metrics["throughput"] = throughput(read_run(path.parent), list(preds.values()))
    metrics["settings"] = settings(read_run(path.parent), list(preds.values()), dataset,
                                   calibration)
    metrics["warnings"] = run_warnings(list(preds.values()))
    return Scored(name or run_name(path), metrics, rows, preds)


def run_warnings(preds: list[Prediction]) -> list[str]:
    """The warnings every verdict of the run carries: about the model or the run, not one
    video (a random test model's scores are meaningless, and a report must say so)."""
    if not preds:
        return []
    return [w for w in preds[0].verdict.warnings
            if all(w in p.verdict.warnings for p in preds[1:])]


def write_metrics(metrics: dict, out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
    return out / METRICS


def run_name(path: Path) -> str:
    """A short column name: the folder of a `predictions.jsonl`, else the file stem."""
    return path.parent.name if path.stem == "predictions" and path.parent.name else path.stem


def throughput(run: dict, preds: list[Prediction]) -> dict:
    """Judged videos per second of judging wall time, over the sessions of the run that judged
    something (a resume with nothing left adds nothing); failed videos are not throughput.
    Without a run record, 1 / mean engine latency. Plus mean per-stage latency."""
    sessions = [s for s in run.get("sessions", []) if s.get("judged", 0) > 0]
    wall = sum(s.get("elapsed_s", 0.0) for s in sessions)
    n = sum(s["judged"] for s in sessions)
    stages = ("decode_video", "prefill", "verdict", "generate", "total")
    mean_ms = {k: (float(np.mean([getattr(p.verdict.timing_ms, k) for p in preds]))
                   if preds else 0.0) for k in stages}
    if wall > 0 and n:
        vps, source = n / wall, "wall"
    else:
        vps = 1000.0 / mean_ms["total"] if mean_ms["total"] > 0 else 0.0
        source = "latency"
    return {"videos_per_s": vps, "source": source, "wall_s": wall, "videos_timed": n,
            "mean_latency_ms": mean_ms}


def settings(run: dict, preds: list[Prediction], dataset: Dataset | None,
             calibration: Calibration | None) -> dict:
    """What was run: from the run record where there is one, else from the verdicts."""
    first = preds[0].verdict if preds else None
    frames = sorted({p.verdict.video.frames_used for p in preds})
    out = {
        "model": first.model if first else None,
        "policy_set": first.policy_set if first else None,
        "layout": first.layout if first else None,
        "mode": first.mode if first else None,
        "keep_ratio": first.pruning.keep_ratio if first else None,
        "frames_used": frames[0] if len(frames) == 1 else frames,
        "dataset": str(dataset.root) if dataset else run.get("dataset"),
        "dataset_layout": dataset.kind if dataset else run.get("layout_kind"),
        "calibration": calibration.method if calibration else None,
    }
    recorded = run.get("settings", {})
    sampling = recorded.get("sampling") or {}
    out.update({k: recorded[k] for k in ("device", "dtype", "decoder", "max_new_tokens")
                if k in recorded})
    if sampling:
        out["frames"] = sampling.get("num_frames")
        out["window_s"] = sampling.get("window_s")
    return out
