"""Benchmark metrics on small hand-computed cases (exact values), plus standard metrics
cross-checked against scikit-learn. Pure and instant: no model, no video.

CASE_A is also scored end to end through `guardrail bench score` in test_bench_run.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm

from guardrail.bench.metrics import (
    EvalSet,
    average_precision,
    evaluate,
    roc_auc,
    trapezoid_auprc,
)
from guardrail.calibration import expected_calibration_error
from guardrail.verdict import Verdict

IDS = ("C1", "C2")

# (video, folder category, subcategory, labels, scores (C1, C2)); flagged = score >= 0.5.
CASE_A = [
    ("v1", "C1", "evident", ("C1",), (0.9, 0.1)),
    ("v2", "C1", "evident", ("C1",), (0.4, 0.2)),
    ("v3", "C1", "evident", ("C1", "C2"), (0.8, 0.3)),
    ("v4", "C1", "benign", (), (0.1, 0.2)),
    ("v5", "C1", "benign", (), (0.2, 0.6)),
    ("v6", "C2", "abuse", ("C2",), (0.3, 0.7)),
    ("v7", "C2", "abuse", ("C2",), (0.6, 0.9)),
    ("v8", "C2", "benign", (), (0.1, 0.6)),
]

# Worked by hand in the comments of test_case_a.
CASE_A_EXPECTED = {
    "safewatch.acc": 1 / 3, "safewatch.f1": 0.7, "safewatch.auprc": 197 / 210,
    "per_category.C1.acc": 6 / 8, "per_category.C1.precision": 2 / 3,
    "per_category.C1.recall": 2 / 3, "per_category.C1.f1": 2 / 3, "per_category.C1.ap": 11 / 12,
    "per_category.C2.acc": 5 / 8, "per_category.C2.precision": 1 / 2,
    "per_category.C2.recall": 2 / 3, "per_category.C2.f1": 4 / 7, "per_category.C2.ap": 13 / 15,
    "micro.precision": 4 / 7, "micro.recall": 2 / 3, "micro.f1": 8 / 13,
    "macro.precision": 7 / 12, "macro.recall": 2 / 3, "macro.f1": 13 / 21,
    "binary.accuracy": 5 / 8, "binary.precision": 2 / 3, "binary.recall": 4 / 5,
    "binary.f1": 8 / 11, "binary.fpr": 2 / 3, "binary.auprc": 33 / 35, "binary.auroc": 13 / 15,
    "calibration.ece": 0.275, "n_videos": 8,
}


def verdict_line(video_path: str, labels, scores: dict[str, float], threshold: float = 0.5,
                 **fields) -> dict:
    """One predictions.jsonl line: a valid SPEC §4.5 verdict plus video_path and labels."""
    flagged = [cid for cid, s in scores.items() if s >= threshold]
    verdict = {
        "flagged": bool(flagged),
        "categories": [{"id": cid, "name": f"Category {cid}", "flagged": cid in flagged,
                        "score": s, "threshold": threshold} for cid, s in scores.items()],
        "segments": [{"start_s": 0.0, "end_s": 2.0, "flagged_ids": flagged, "scores": scores}],
        "model": "fake", "policy_set": "test", "layout": "parallel", "mode": "fast",
        "video": {"duration_s": 2.0, "frames_used": 8},
        "pruning": {"keep_ratio": 1.0, "kept_tokens": 16, "total_tokens": 16},
        "timing_ms": {"total": 250.0}, **fields,
    }
    return {**Verdict.model_validate(verdict).model_dump(mode="json"), "video_path": video_path,
            "labels": list(labels)}


def write_case(rows, root: Path, out: Path, shift: float = 0.0) -> tuple[Path, Path]:
    """A SafeWatch-Bench layout for `rows` under root (videos need not exist to score) and a
    predictions file (scores + shift, clipped) in out. Returns (dataset root, predictions)."""
    files: dict[Path, list] = {}
    for video, cat, sub, labels, _ in rows:
        files.setdefault(root / "real" / cat / f"{sub}_benchmark.json", []).append(
            {"video_path": f"real/videos/{video}.mp4", "labels": [int(c[1:]) for c in labels]})
    for path, items in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(items))
    out.mkdir(parents=True, exist_ok=True)
    lines = [verdict_line(f"real/videos/{video}.mp4", labels,
                          {cid: min(1.0, max(0.0, s + shift)) for cid, s in zip(IDS, sc,
                                                                               strict=True)})
             for video, _, _, labels, sc in rows]
    (out / "predictions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root, out / "predictions.jsonl"


def eval_set(rows, ids=IDS, threshold: float = 0.5) -> EvalSet:
    return EvalSet(
        category_ids=tuple(ids),
        labels=tuple(tuple(r[3]) for r in rows),
        flagged=tuple(tuple(c for c, s in zip(ids, r[4], strict=True) if s >= threshold)
                      for r in rows),
        scores=np.array([r[4] for r in rows], dtype=np.float64).reshape(len(rows), len(ids)),
        category=tuple(r[1] for r in rows),
        subcategory=tuple(r[2] for r in rows),
        benign=np.array([r[2] == "benign" for r in rows], dtype=bool),
    )


def get(metrics: dict, dotted: str):
    for part in dotted.split("."):
        metrics = metrics[part]
    return metrics


def test_case_a():
    # SafeWatch ACC: C1 = mean(evident 1/3, benign 1/2) = 5/12; C2 = mean(abuse 1/2, benign 0)
    # = 1/4; overall (5/12 + 3/12) / 2 = 1/3.
    # SafeWatch F1: C1 evident TP=2 FN=1 -> 0.8; C1 benign: v4 and v5 are correct rejections *of
    # C1* (v5's C2 flag is not C1) -> TP=2 -> 1.0; C2 abuse TP=2 -> 1.0; C2 benign v8 flags C2 ->
    # FP -> 0.0. Categories 0.9 and 0.5 -> 0.7.
    # AUPRC (trapezoid): unsafe scores .9+ .4+ .8+ .2- .6- .7+ .9+ .6-; points (0,1) (.4,1) (.6,1)
    # (.8,1) (.8,4/6) (1,5/7) (1,5/8) -> 0.8 + 0.2 * (2/3 + 5/7) / 2 = 197/210.
    # AP: 0.8 + 0.2 * 5/7 = 33/35. AUROC: 13 of 15 positive/negative pairs ordered.
    # ECE: 16 (video, category) pairs in 10 bins, sum of n_b |frac - conf| = 4.4 -> 4.4 / 16.
    m = evaluate(eval_set(CASE_A))
    for key, want in CASE_A_EXPECTED.items():
        assert get(m, key) == pytest.approx(want, abs=1e-12), key
    assert m["safewatch"]["per_category"]["C1"] == pytest.approx({"acc": 5 / 12, "f1": 0.9})
    assert m["safewatch"]["per_category"]["C2"] == pytest.approx({"acc": 1 / 4, "f1": 0.5})
    assert [(r["category"], r["subcategory"], r["n"]) for r in m["subcategories"]] == [
        ("C1", "evident", 3), ("C1", "benign", 2), ("C2", "abuse", 2), ("C2", "benign", 1)]
    assert m["undefined"] == []


def test_ties_in_scores():
    y = np.array([1, 0, 1, 0], bool)
    s = np.full(4, 0.5)
    # One threshold: everything enters at once -> points (0, 1), (1, 0.5).
    assert average_precision(y, s) == pytest.approx(0.5)
    assert trapezoid_auprc(y, s) == pytest.approx(0.75)
    assert roc_auc(y, s) == pytest.approx(0.5)
    y = np.array([1, 1, 0, 0], bool)
    s = np.array([0.8, 0.5, 0.5, 0.2])
    # thresholds .8: tp1 fp0; .5: tp2 fp1; .2: tp2 fp2.
    assert average_precision(y, s) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert trapezoid_auprc(y, s) == pytest.approx(0.5 + 0.5 * (1 + 2 / 3) / 2)
    assert roc_auc(y, s) == pytest.approx(3.5 / 4)       # the tie counts half
    assert average_precision(y, s) == pytest.approx(skm.average_precision_score(y, s))
    assert roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s))


def test_empty_category_is_listed_and_left_out_of_macro():
    rows = [("a", "C1", "x", ("C1",), (0.9, 0.1, 0.0)), ("b", "C1", "x", (), (0.2, 0.1, 0.0))]
    m = evaluate(eval_set(rows, ids=("C1", "C2", "C3")))
    assert m["per_category"]["C3"] == {"acc": 1.0, "precision": 0.0, "recall": 0.0, "f1": 0.0,
                                       "ap": 0.0}
    assert {"per_category.C3.precision", "per_category.C3.recall", "per_category.C3.f1",
            "per_category.C3.ap"} <= set(m["undefined"])
    assert m["counts"]["macro_categories"] == ["C1"]
    assert m["macro"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert m["micro"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0}


def test_macro_counts_an_undefined_member_as_zero():
    # C2 is labelled once and never flagged: precision 0/0 -> counts as 0 in the macro mean.
    rows = [("a", "C1", "x", ("C1",), (0.9, 0.1)), ("b", "C2", "y", ("C2",), (0.2, 0.3)),
            ("c", "C1", "benign", (), (0.6, 0.1))]
    m = evaluate(eval_set(rows))
    assert m["per_category"]["C2"]["precision"] == 0.0
    assert "per_category.C2.precision" in m["undefined"]
    assert m["macro"]["precision"] == pytest.approx((1 / 2 + 0) / 2)
    assert m["macro"]["recall"] == pytest.approx((1 + 0) / 2)
    assert m["macro"]["f1"] == pytest.approx((2 / 3 + 0) / 2)
    assert "macro.precision" not in m["undefined"]
    labels = np.array([[1, 0], [0, 1], [0, 0]], bool)
    pred = np.array([[1, 0], [0, 0], [1, 0]], bool)
    assert m["macro"]["f1"] == pytest.approx(skm.f1_score(labels, pred, average="macro"))


def test_all_benign():
    rows = [("a", "C1", "benign", (), (0.1, 0.2)), ("b", "C1", "benign", (), (0.7, 0.2)),
            ("c", "C2", "benign", (), (0.3, 0.4))]
    m = evaluate(eval_set(rows))
    b = m["binary"]
    assert (b["accuracy"], b["precision"], b["recall"], b["f1"]) == (2 / 3, 0.0, 0.0, 0.0)
    assert b["fpr"] == pytest.approx(1 / 3)
    assert (b["auprc"], b["auroc"], m["safewatch"]["auprc"]) == (0.0, 0.5, 0.0)
    assert {"binary.recall", "binary.auprc", "binary.auroc", "safewatch.auprc",
            "macro.f1", "micro.recall"} <= set(m["undefined"])
    # SafeWatch: C1 benign has one correct rejection (TP) and one C1 flag (FP) -> F1 2/3;
    # C2 benign's one video is a correct rejection -> 1.0.
    assert m["safewatch"]["acc"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["safewatch"]["f1"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["calibration"]["ece"] == pytest.approx(expected_calibration_error(
        np.array([r[4] for r in rows]), np.zeros((3, 2))))


def test_all_unsafe():
    rows = [("a", "C1", "x", ("C1",), (0.9, 0.2)), ("b", "C1", "x", ("C1",), (0.3, 0.2)),
            ("c", "C2", "y", ("C2",), (0.4, 0.6))]
    m = evaluate(eval_set(rows))
    b = m["binary"]
    assert (b["accuracy"], b["precision"], b["recall"]) == pytest.approx((2 / 3, 1.0, 2 / 3))
    assert (b["fpr"], b["auroc"]) == (0.0, 0.5)
    assert (b["auprc"], m["safewatch"]["auprc"]) == (1.0, 1.0)
    assert set(m["undefined"]) == {"binary.fpr", "binary.auroc"}
    assert m["safewatch"]["acc"] == pytest.approx((1 / 2 + 1) / 2)


def test_no_rows_at_all():
    m = evaluate(eval_set([]))
    assert m["n_videos"] == 0
    assert m["safewatch"]["acc"] == 0.0 and "safewatch.acc" in m["undefined"]


def test_manifest_benign_without_category_is_its_own_group():
    # A benign video with no known category: "predicted" means any flag.
    rows = [("a", None, "benign", (), (0.1, 0.2)), ("b", None, "benign", (), (0.1, 0.8)),
            ("c", None, "c1", ("C1",), (0.9, 0.1))]
    m = evaluate(eval_set(rows))
    assert set(m["safewatch"]["per_category"]) == {"benign", "C1"}
    assert m["safewatch"]["per_category"]["benign"] == pytest.approx({"acc": 0.5, "f1": 2 / 3})
    assert m["safewatch"]["acc"] == pytest.approx(0.75)


def test_ece_hand_computed():
    s = np.array([0.05, 0.15, 0.15, 0.95, 1.0])
    y = np.array([0, 1, 0, 1, 1])
    # bins: [0,.1): (.05, 0) -> .05; [.1,.2): mean .15, frac .5 -> .35 * 2; [.9,1]: mean .975,
    # frac 1 -> .025 * 2.
    assert expected_calibration_error(s, y) == pytest.approx((0.05 + 0.7 + 0.05) / 5)
    assert expected_calibration_error(np.array([]), np.array([])) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_standard_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n, ids = 40, ("C1", "C2", "C3")
    labels = rng.random((n, 3)) < 0.3
    scores = np.round(np.clip(labels * 0.3 + rng.random((n, 3)) * 0.7, 0, 1), 1)  # many ties
    scores[:, 2] *= 0.5 if seed % 2 else 1.0       # C3 never flagged on odd seeds
    rows = [(f"v{i}", None, "x", tuple(c for c, on in zip(ids, labels[i], strict=True) if on),
             tuple(scores[i])) for i in range(n)]
    m = evaluate(eval_set(rows, ids=ids))
    pred = scores >= 0.5
    for k, cid in enumerate(ids):
        pc = m["per_category"][cid]
        assert pc["precision"] == pytest.approx(
            skm.precision_score(labels[:, k], pred[:, k], zero_division=0))
        assert pc["recall"] == pytest.approx(skm.recall_score(labels[:, k], pred[:, k]))
        assert pc["f1"] == pytest.approx(skm.f1_score(labels[:, k], pred[:, k]))
        assert pc["acc"] == pytest.approx(skm.accuracy_score(labels[:, k], pred[:, k]))
        assert pc["ap"] == pytest.approx(skm.average_precision_score(labels[:, k], scores[:, k]))
    for avg in ("micro", "macro"):
        assert m[avg]["f1"] == pytest.approx(skm.f1_score(labels, pred, average=avg))
        assert m[avg]["precision"] == pytest.approx(
            skm.precision_score(labels, pred, average=avg, zero_division=0))
    unsafe, s = labels.any(1), scores.max(1)
    assert m["binary"]["auroc"] == pytest.approx(skm.roc_auc_score(unsafe, s))
    assert m["binary"]["auprc"] == pytest.approx(skm.average_precision_score(unsafe, s))
    assert m["binary"]["f1"] == pytest.approx(skm.f1_score(unsafe, pred.any(1)))
    # SafeWatch's AUPRC is sklearn's precision_recall_curve + trapezoid `auc` (here benign = no
    # labels, as in a manifest).
    precision, recall, _ = skm.precision_recall_curve(unsafe, s)
    assert trapezoid_auprc(unsafe, s) == pytest.approx(skm.auc(recall, precision))


def test_every_rate_is_a_fraction():
    m = evaluate(eval_set(CASE_A))
    rates = [m["safewatch"][k] for k in ("acc", "f1", "auprc")]
    rates += [v for c in m["per_category"].values() for v in c.values()]
    rates += [*m["micro"].values(), *m["macro"].values(), *m["binary"].values(),
              m["calibration"]["ece"]]
    assert all(isinstance(r, float) and 0.0 <= r <= 1.0 and not math.isnan(r) for r in rates)
