"""Per-category score calibration: temperature or Platt scaling on the logit of a score.

A category's calibrated score is `sigmoid(a * logit(score) + b)`: temperature scaling fits
`a = 1 / T` with `b = 0`, Platt scaling fits both. `a` is kept positive, so calibration never
reorders videos within a category and commutes with the max over windows. Fit on a labelled split
(`guardrail bench calibrate`), saved as JSON (or YAML) beside the policy set
(`policies/safewatch.calibration.json`) or in the model directory
(`<model>/calibration/<policy_set>.json`), then applied by `Calibration.apply`.

    cal = fit(scores, labels, ["C1", "C2"], method="temperature")   # scores, labels: [n, m]
    save(cal, default_path(policy="policies/safewatch.yaml"))
    cal.apply("C1", 0.93)   # -> calibrated score
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml

from guardrail.errors import UsageError
from guardrail.shipped import shipped_dir

if TYPE_CHECKING:
    from guardrail.verdict import Verdict

METHODS = ("temperature", "platt")
FORMAT = "guardrail-calibration/1"
EPS = 1e-6                   # scores are clipped to [EPS, 1 - EPS] before the logit
A_MIN, A_MAX = 1e-2, 1e2     # bounds on the logit slope (temperature in [0.01, 100])
MIN_PER_CLASS = 1            # a category needs this many positives and negatives to be fitted


# ----------------------------------------------------------------------------- pure math

def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0 - EPS)
    return np.log(p) - np.log1p(-p)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


def reliability_bins(scores: np.ndarray, labels: np.ndarray, bins: int = 10
                     ) -> list[tuple[float, float, int, float, float]]:
    """Equal-width bins over [0, 1] (a score of 1.0 falls in the last bin). Per bin:
    (low, high, count, mean score, fraction positive); empty bins have count 0 and NaN means."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    assert s.shape == y.shape, f"scores {s.shape} and labels {y.shape} differ"
    idx = np.minimum((s * bins).astype(np.int64), bins - 1)
    out = []
    for b in range(bins):
        sel = idx == b
        n = int(sel.sum())
        conf = float(s[sel].mean()) if n else math.nan
        frac = float(y[sel].mean()) if n else math.nan
        out.append((b / bins, (b + 1) / bins, n, conf, frac))
    return out


def expected_calibration_error(scores: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """ECE = sum over bins of (bin count / N) * |fraction positive - mean score|; 0 when empty."""
    rows = reliability_bins(scores, labels, bins)
    total = sum(n for _, _, n, _, _ in rows)
    if total == 0:
        return 0.0
    return float(sum(n / total * abs(frac - conf) for _, _, n, conf, frac in rows if n))


def _nll(a: float, b: float, z: np.ndarray, t: np.ndarray) -> float:
    u = a * z + b   # -[t log s(u) + (1 - t) log(1 - s(u))] = softplus(u) - t * u
    return float(np.mean(np.logaddexp(0.0, u) - t * u))


def _golden(fn, lo: float, hi: float, iters: int = 80) -> float:
    """Minimiser of a unimodal fn on [lo, hi]."""
    g = (math.sqrt(5.0) - 1.0) / 2.0
    x1, x2 = hi - g * (hi - lo), lo + g * (hi - lo)
    f1, f2 = fn(x1), fn(x2)
    for _ in range(iters):
        if f1 <= f2:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - g * (hi - lo)
            f1 = fn(x1)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + g * (hi - lo)
            f2 = fn(x2)
    return (lo + hi) / 2.0


def _fit_bias(a: float, z: np.ndarray, t: np.ndarray, b: float = 0.0) -> float:
    """Newton on b alone (convex), slope fixed."""
    for _ in range(50):
        p = sigmoid(a * z + b)
        g, h = float(np.mean(p - t)), float(np.mean(p * (1 - p))) + 1e-12
        b -= min(max(g / h, -2.0), 2.0)     # damped: a full Newton step can overshoot
        if abs(g) < 1e-12:
            break
    return b


@dataclass(frozen=True)
class Scaling:
    """calibrated = sigmoid(a * logit(score) + b); the identity is a=1, b=0."""

    a: float = 1.0
    b: float = 0.0

    def __call__(self, score: float | np.ndarray) -> np.ndarray:
        return sigmoid(self.a * logit(score) + self.b)


def fit_scaling(scores: np.ndarray, labels: np.ndarray, method: str = "temperature") -> Scaling:
    """Fit one category's scaling by minimum log loss. The identity when the split lacks a class."""
    if method not in METHODS:
        raise UsageError(f"unknown calibration method {method!r}; choose one of {METHODS}")
    z = logit(scores).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    n_pos = int(y.sum())
    if n_pos < MIN_PER_CLASS or len(y) - n_pos < MIN_PER_CLASS:
        return Scaling()
    if method == "temperature":
        log_a = _golden(lambda la: _nll(math.exp(la), 0.0, z, y), math.log(A_MIN), math.log(A_MAX))
        return Scaling(a=math.exp(log_a))
    # Platt (1999): smoothed targets keep the fit finite on separable data. Damped Newton.
    t = np.where(y > 0, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (len(y) - n_pos + 2.0))
    a, b = 1.0, 0.0
    loss = _nll(a, b, z, t)
    for _ in range(100):
        p = sigmoid(a * z + b)
        w = p * (1 - p) + 1e-12
        grad = np.array([np.mean((p - t) * z), np.mean(p - t)])
        hess = np.array([[np.mean(w * z * z), np.mean(w * z)], [np.mean(w * z), np.mean(w)]])
        step = np.linalg.solve(hess + 1e-9 * np.eye(2), grad)
        scale = 1.0
        while scale > 1e-10:     # backtrack until the loss falls enough (Armijo)
            new = _nll(a - scale * step[0], b - scale * step[1], z, t)
            if new <= loss - 1e-4 * scale * float(grad @ step):
                break
            scale /= 2
        a, b, loss = a - scale * float(step[0]), b - scale * float(step[1]), new
        if scale * np.abs(step).max() < 1e-10:
            break
    if not A_MIN <= a <= A_MAX or not math.isfinite(b):
        a = min(max(a, A_MIN), A_MAX) if math.isfinite(a) else 1.0
        b = _fit_bias(a, z, t)
    return Scaling(a=a, b=b)


# ----------------------------------------------------------------------------- the fitted set

@dataclass(frozen=True)
class Calibration:
    """Scalings per category id; categories without one pass through unchanged."""

    method: str
    scalings: Mapping[str, Scaling]
    policy_set: str | None = None
    model: str | None = None
    n_videos: int = 0
    ece_before: float | None = None
    ece_after: float | None = None
    info: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # id -> n, n_pos

    def apply(self, category_id: str, score: float) -> float:
        """The calibrated score of one category."""
        scaling = self.scalings.get(category_id)
        return float(score) if scaling is None else float(scaling(score))

    def apply_many(self, category_ids: Sequence[str], scores: np.ndarray) -> np.ndarray:
        """scores: [..., m], column k belongs to category_ids[k]. Same shape back."""
        s = np.asarray(scores, dtype=np.float64)
        out = s.copy()
        for k, cid in enumerate(category_ids):
            if cid in self.scalings:
                out[..., k] = self.scalings[cid](s[..., k])
        return out

    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "method": self.method, "policy_set": self.policy_set,
            "model": self.model, "n_videos": self.n_videos,
            "ece_before": self.ece_before, "ece_after": self.ece_after,
            "categories": {cid: {"a": s.a, "b": s.b, "temperature": 1.0 / s.a,
                                 **self.info.get(cid, {})}
                           for cid, s in self.scalings.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping, source: str = "<dict>") -> Calibration:
        try:
            if data.get("format") != FORMAT:
                raise ValueError(f"format must be {FORMAT!r}")
            if data["method"] not in METHODS:
                raise ValueError(f"method must be one of {METHODS}")
            scalings = {str(cid): Scaling(float(v["a"]), float(v["b"]))
                        for cid, v in data["categories"].items()}
            if any(not (s.a > 0 and math.isfinite(s.a) and math.isfinite(s.b))
                   for s in scalings.values()):
                raise ValueError("every category needs a finite a > 0 and a finite b")
            info = {cid: {k: int(v[k]) for k in ("n", "n_pos")}
                    for cid, v in data["categories"].items() if "n" in v and "n_pos" in v}
            return cls(data["method"], scalings, data.get("policy_set"), data.get("model"),
                       int(data.get("n_videos", 0)), data.get("ece_before"),
                       data.get("ece_after"), info)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise UsageError(f"{source}: not a calibration file: {error}") from None


def fit(scores: np.ndarray, labels: np.ndarray, category_ids: Sequence[str],
        method: str = "temperature", policy_set: str | None = None,
        model: str | None = None) -> Calibration:
    """Fit every category on a labelled split. scores, labels: [n, m] (column k = category k).
    `ece_before` / `ece_after` are measured on the same split over all (video, category) pairs."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    assert s.shape == y.shape and s.ndim == 2 and s.shape[1] == len(category_ids), \
        f"scores {s.shape}, labels {y.shape}, {len(category_ids)} categories"
    scalings = {cid: fit_scaling(s[:, k], y[:, k], method) for k, cid in enumerate(category_ids)}
    info = {cid: {"n": len(y), "n_pos": int(y[:, k].sum())} for k, cid in enumerate(category_ids)}
    after = Calibration(method, scalings).apply_many(category_ids, s)
    return Calibration(method, scalings, policy_set, model, len(y),
                       expected_calibration_error(s, y), expected_calibration_error(after, y),
                       info)


SMALL_SPLIT = 30     # fewer labelled videos than this: a fit says it is unreliable


def fit_warnings(cal: Calibration) -> list[str]:
    """What an author should know about a fit: too few videos, categories left unfitted
    (a class missing), and slopes pinned at their bound (the fit could not find signal)."""
    out = []
    if cal.n_videos < SMALL_SPLIT:
        out.append(f"only {cal.n_videos} labelled videos: a calibration fitted on fewer than "
                   f"{SMALL_SPLIT} is unreliable")
    for cid, counts in cal.info.items():
        n, pos = counts["n"], counts["n_pos"]
        scaling = cal.scalings.get(cid, Scaling())
        if pos < MIN_PER_CLASS or n - pos < MIN_PER_CLASS:
            out.append(f"{cid}: not fitted ({pos} positive, {n - pos} negative; needs at least "
                       f"{MIN_PER_CLASS} of each), scores pass through unchanged")
        elif min(abs(math.log(scaling.a / A_MIN)), abs(math.log(scaling.a / A_MAX))) < 0.05:
            out.append(f"{cid}: the fitted slope sits at its bound (a = {scaling.a:.3g}, "
                       f"temperature {1 / scaling.a:.3g}); "
                       + ("scores are flattened towards 0.5: they carry no signal on this split"
                          if scaling.a <= A_MIN * 1.06 else "scores are pushed to 0 or 1"))
    return out


# ----------------------------------------------------------------------------- files

def save(cal: Calibration, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = cal.to_dict()
    if path.suffix in (".yaml", ".yml"):
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    else:
        path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def load(path: str | os.PathLike) -> Calibration:
    path = Path(path)
    try:
        text = path.read_text()
        data = (yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text))
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise UsageError(f"{path}: cannot read calibration: {error}") from None
    if not isinstance(data, Mapping):
        raise UsageError(f"{path}: not a calibration file: not a mapping")
    return Calibration.from_dict(data, str(path))


def default_path(policy: str | os.PathLike | None = None, model: str | os.PathLike | None = None,
                 policy_set: str | None = None, beside: str | os.PathLike | None = None
                 ) -> Path:
    """Beside the policy file (`x.yaml` -> `x.calibration.json`), else in the model directory
    (`<model>/calibration/<policy_set>.json`), else beside the file `beside` (a run's
    predictions: `<its folder>/<policy_set>.calibration.json`)."""
    if policy is not None:
        p = Path(policy)
        return p.with_name(f"{p.stem}.calibration.json")
    if model is not None and policy_set:
        return Path(model) / "calibration" / f"{policy_set}.json"
    if beside is not None and policy_set:
        return Path(beside).parent / f"{policy_set}.calibration.json"
    raise UsageError("say where to store the calibration: a policy file, a model directory, "
                     "or an output path")


def check_writable_place(path: Path) -> None:
    """Refuse to write a calibration into guardrail's own shipped policies folder (a source
    checkout's `policies/`, or the installed package's data): `--calibration auto` would then
    apply it to everyone who uses the shipped set."""
    shipped = shipped_dir("policies").resolve()
    if path.resolve().parent == shipped:
        raise UsageError(f"{path} is in guardrail's own policies folder ({shipped}); keep the "
                         "calibration with your run (the default, beside the predictions), or "
                         "give --out, or calibrate a copy of the policy file")


def discover(policy: str | os.PathLike | None, model: str | os.PathLike | None,
             policy_set: str) -> Path | None:
    """The calibration file an engine would use by default, if one exists."""
    candidates = []
    if policy is not None:
        candidates.append(default_path(policy=policy))
    if model is not None and Path(model).is_dir():
        candidates.append(default_path(model=model, policy_set=policy_set))
    return next((c for c in candidates if c.is_file()), None)


def calibrate_verdict(verdict: Verdict, cal: Calibration) -> Verdict:
    """The verdict with every category and window score calibrated and the flags re-derived
    from the thresholds (text fields are kept as they are)."""
    thresholds = {c.id: c.threshold for c in verdict.categories}
    cats = []
    for c in verdict.categories:
        score = cal.apply(c.id, c.score)
        cats.append(c.model_copy(update={"score": score, "flagged": score >= c.threshold}))
    segments = []
    for seg in verdict.segments:
        scores = {cid: cal.apply(cid, s) for cid, s in seg.scores.items()}
        flagged = [cid for cid, s in scores.items() if s >= thresholds.get(cid, math.inf)]
        segments.append(seg.model_copy(update={"scores": scores, "flagged_ids": flagged}))
    return verdict.model_copy(update={"categories": cats, "segments": segments,
                                      "flagged": any(c.flagged for c in cats)})


def for_policy_set(cal: Calibration, policy_set: str, source: str = "calibration") -> Calibration:
    """Check that a calibration was fitted for this policy set (by name)."""
    if cal.policy_set is not None and cal.policy_set != policy_set:
        raise UsageError(f"{source} was fitted for policy set {cal.policy_set!r}, "
                         f"not {policy_set!r}")
    return cal


def resolve(setting: str | os.PathLike | None, policy: str | os.PathLike | None = None,
            model: str | os.PathLike | None = None, policy_set: str = "") -> Calibration | None:
    """An engine's calibration from its setting: None or "off" = none; "auto" = the file beside
    the policy file or in the model directory, if there is one; else a calibration file."""
    if setting is None or setting == "off":
        return None
    path = discover(policy, model, policy_set) if setting == "auto" else Path(setting)
    return None if path is None else for_policy_set(load(path), policy_set, str(path))
