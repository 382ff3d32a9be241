"""`report.md` and its plots (PNG): per-category F1 bars, the binary precision-recall curve and a
reliability diagram, plus tables per category and subcategory, throughput and run settings.

Plots use matplotlib's object API (`Figure`), never pyplot, so no global backend state is touched.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from guardrail.bench.metrics import pr_curve, unsafe_score
from guardrail.bench.score import Scored
from guardrail.calibration import reliability_bins

REPORT = "report.md"
PLOTS = {"f1": "per_category_f1.png", "pr": "binary_pr_curve.png",
         "reliability": "reliability.png"}


def write_report(scored: Scored, out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_f1(scored.metrics, out / PLOTS["f1"])
    plot_pr(scored, out / PLOTS["pr"])
    plot_reliability(scored, out / PLOTS["reliability"])
    (out / REPORT).write_text(render(scored))
    return out / REPORT


# ----------------------------------------------------------------------------- markdown

def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows] + [""]


def render(scored: Scored) -> str:
    m = scored.metrics
    sw, b = m["safewatch"], m["binary"]
    lines = [f"# Benchmark report: {scored.name}", ""]
    lines += [f"> **Warning:** {w}" for w in m.get("warnings", ())]
    lines += [""] if m.get("warnings") else []
    lines += ["## Run settings", ""]
    lines += _table(["setting", "value"],
                    [[k, f"`{v}`"] for k, v in m["settings"].items() if v is not None])
    lines += ["## Summary", "",
              f"{m['n_videos']} videos scored, {m['n_failed']} failed or without a prediction.",
              ""]
    lines += _table(["metric", "value"], [
        ["SafeWatch ACC", _f(sw["acc"])], ["SafeWatch F1", _f(sw["f1"])],
        ["SafeWatch AUPRC", _f(sw["auprc"])],
        ["micro P / R / F1", " / ".join(_f(m["micro"][k]) for k in ("precision", "recall", "f1"))],
        ["macro P / R / F1", " / ".join(_f(m["macro"][k]) for k in ("precision", "recall", "f1"))],
        ["binary accuracy", _f(b["accuracy"])],
        ["binary P / R / F1", " / ".join(_f(b[k]) for k in ("precision", "recall", "f1"))],
        ["binary FPR", _f(b["fpr"])], ["binary AUPRC (AP)", _f(b["auprc"])],
        ["binary AUROC", _f(b["auroc"])], ["ECE", _f(m["calibration"]["ece"])]])
    lines += ["## Per category", "", f"![per-category F1]({PLOTS['f1']})", ""]
    counts, swc = m["counts"]["per_category"], sw["per_category"]
    lines += _table(
        ["id", "support", "flagged", "SW ACC", "SW F1", "acc", "precision", "recall", "F1", "AP"],
        [[cid, str(counts[cid]["support"]), str(counts[cid]["predicted"]),
          _f(swc.get(cid, {}).get("acc")), _f(swc.get(cid, {}).get("f1")),
          *(_f(v[k]) for k in ("acc", "precision", "recall", "f1", "ap"))]
         for cid, v in m["per_category"].items()])
    lines += ["`SW` columns are SafeWatch's: exact-match accuracy and F1 over the category's "
              "subcategories (its benign subcategory included); the others treat each category "
              "as its own binary task over all videos.", ""]
    lines += ["## Per subcategory", ""]
    lines += _table(["category", "subcategory", "videos", "ACC", "F1"],
                    [[r["category"], r["subcategory"], str(r["n"]), _f(r["acc"]), _f(r["f1"])]
                     for r in m["subcategories"]])
    lines += ["## Safe / unsafe", "", f"![precision-recall curve]({PLOTS['pr']})", "",
              "A video is unsafe when it has any label and flagged when any category is; its "
              "unsafe score is the max of its category scores.", ""]
    lines += ["## Calibration", "", f"![reliability diagram]({PLOTS['reliability']})", "",
              f"ECE over all (video, category) scores: {_f(m['calibration']['ece'])} "
              "(10 equal-width bins).", ""]
    t = m["throughput"]
    lines += ["## Throughput", ""]
    lines += _table(["measure", "value"], [
        ["videos / s", f"{t['videos_per_s']:.3f} ({t['source']})"],
        ["judging wall time (s)", f"{t['wall_s']:.1f}"],
        *[[f"mean {k} (ms)", f"{v:.1f}"] for k, v in t["mean_latency_ms"].items()]])
    if m["failed"]:
        lines += ["## Failed videos", ""]
        lines += [f"- `{f['video_path']}`: {f['error']['type']}: {f['error']['message']}"
                  for f in m["failed"][:100]]
        lines += [f"- ... and {len(m['failed']) - 100} more" if len(m["failed"]) > 100 else "", ""]
    if m["undefined"]:
        lines += ["## Undefined metrics", "",
                  "These have a zero denominator on this set and are reported as 0 (AUROC 0.5): "
                  + ", ".join(f"`{k}`" for k in m["undefined"]), ""]
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------- plots

def _figure(width: float = 6.0, height: float = 4.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    return fig, fig.add_subplot()


def plot_f1(metrics: dict, path: Path) -> None:
    ids = list(metrics["per_category"])
    # a category without a positive label has no F1 to show: no bar (not a zero one), marked
    unlabelled = {c for c in ids if not metrics["counts"]["per_category"][c]["support"]}
    f1 = [np.nan if c in unlabelled else metrics["per_category"][c]["f1"] for c in ids]
    sw = [np.nan if c in unlabelled else
          metrics["safewatch"]["per_category"].get(c, {}).get("f1", 0.0) for c in ids]
    fig, ax = _figure(max(4.0, 0.8 * len(ids) + 2), 4.0)
    x = np.arange(len(ids))
    ax.bar(x - 0.2, f1, 0.4, label="F1 (binary per category)")
    ax.bar(x + 0.2, sw, 0.4, label="SafeWatch F1")
    for i, c in enumerate(ids):
        if c in unlabelled:
            ax.text(i, 0.02, "no positives", ha="center", va="bottom", rotation=90,
                    fontsize="small", color="grey")
    ax.set_xticks(x, ids)
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1")
    ax.set_title("F1 per category")
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)


def plot_pr(scored: Scored, path: Path) -> None:
    rows = scored.rows
    y = np.array([bool(labels) for labels in rows.labels], bool)
    recall, precision = pr_curve(y, unsafe_score(rows.scores))
    fig, ax = _figure(5.0, 4.5)
    if len(recall):     # the (0, 1) anchor AP counts from is not a measured point: not drawn
        ax.step(recall[1:], precision[1:], where="pre", marker=".",
                label=f"AP {scored.metrics['binary']['auprc']:.3f}")
        ax.legend(loc="lower left")
    else:
        ax.text(0.5, 0.5, "no unsafe videos", ha="center", va="center")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall (unsafe score = max over categories)")
    ax.set_ylabel("precision")
    ax.set_title("Safe / unsafe precision-recall")
    fig.tight_layout()
    fig.savefig(path)


def plot_reliability(scored: Scored, path: Path) -> None:
    rows = scored.rows
    bins = reliability_bins(rows.scores, rows.matrix(rows.labels))
    fig, ax = _figure(5.0, 4.5)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect")
    filled = [(lo, hi, n, conf, frac) for lo, hi, n, conf, frac in bins if n]
    if filled:
        ax.bar([lo for lo, *_ in filled], [frac for *_, frac in filled],
               width=[hi - lo for lo, hi, *_ in filled], align="edge", alpha=0.6,
               edgecolor="black", label="fraction positive")
        ax.plot([c for *_, c, _ in filled], [f for *_, f in filled], "o-", color="C3",
                label="mean score vs fraction positive")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("score")
    ax.set_ylabel("fraction labelled")
    ax.set_title(f"Reliability (ECE {scored.metrics['calibration']['ece']:.3f})")
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
