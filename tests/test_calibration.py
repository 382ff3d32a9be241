"""Per-category temperature / Platt calibration: fitting lowers ECE on miscalibrated scores, files
round-trip, verdicts are rescaled, and `guardrail bench calibrate` writes a usable file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_bench_metrics import verdict_line
from typer.testing import CliRunner

from guardrail import calibration as cal
from guardrail.bench.command import bench_app
from guardrail.errors import UsageError
from guardrail.verdict import Verdict


def miscalibrated(n: int, seed: int, slope: float = 3.0, bias: float = 0.0):
    """True probabilities p ~ U(0, 1), labels ~ Bernoulli(p), reported scores
    sigmoid(slope * logit(p) + bias): overconfident for slope > 1, shifted for bias != 0."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.02, 0.98, size=(n, 2))
    y = rng.random((n, 2)) < p
    return cal.sigmoid(slope * cal.logit(p) + bias), y


@pytest.mark.parametrize("method, slope, bias", [("temperature", 3.0, 0.0),
                                                 ("platt", 2.0, 1.5)])
def test_fit_lowers_ece(method, slope, bias):
    scores, labels = miscalibrated(4000, seed=0, slope=slope, bias=bias)
    fitted = cal.fit(scores, labels, ["C1", "C2"], method=method, policy_set="s")
    assert fitted.ece_before > 0.08
    assert fitted.ece_after < 0.03
    assert fitted.ece_after < fitted.ece_before / 3
    for s in fitted.scalings.values():      # recovers the inverse map
        assert s.a == pytest.approx(1 / slope, rel=0.15)
        if method == "platt":
            assert s.b == pytest.approx(-bias / slope, abs=0.2)
    # ... and it generalises to a fresh sample from the same model.
    test_scores, test_labels = miscalibrated(4000, seed=1, slope=slope, bias=bias)
    after = fitted.apply_many(["C1", "C2"], test_scores)
    assert cal.expected_calibration_error(after, test_labels) < \
        cal.expected_calibration_error(test_scores, test_labels) / 3



def write_predictions(path, n: int, seed: int) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """A predictions.jsonl of `n` verdicts over categories C1, C2 with `miscalibrated` scores
    and labels, written at `path` (its folder made). Returns the verdicts, scores and labels."""
    scores, labels = miscalibrated(n, seed=seed)
    ids = ["C1", "C2"]
    lines = [verdict_line(f"v{i}.mp4", [c for c, on in zip(ids, labels[i], strict=True) if on],
                          dict(zip(ids, map(float, scores[i]), strict=True)))
             for i in range(n)]
    path.parent.mkdir()
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return lines, scores, labels

def test_apply_is_monotone_and_per_category():
    c = cal.Calibration("platt", {"C1": cal.Scaling(0.5, -1.0)})
    xs = np.linspace(0, 1, 101)
    ys = [c.apply("C1", x) for x in xs]
    assert all(b >= a for a, b in zip(ys, ys[1:], strict=False))
    assert c.apply("C9", 0.37) == 0.37                      # no scaling: unchanged
    assert c.apply("C1", 0.5) == pytest.approx(cal.sigmoid(-1.0))
    assert c.apply_many(["C9", "C1"], np.array([[0.37, 0.5]]))[0] == pytest.approx(
        [0.37, float(cal.sigmoid(-1.0))])


def test_one_class_split_is_left_alone():
    scores = np.array([[0.2], [0.9], [0.4]])
    fitted = cal.fit(scores, np.zeros((3, 1)), ["C1"], method="platt")
    assert fitted.scalings["C1"] == cal.Scaling()
    assert fitted.ece_after == pytest.approx(fitted.ece_before)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_save_load_round_trip(tmp_path, suffix):
    scores, labels = miscalibrated(300, seed=2)
    fitted = cal.fit(scores, labels, ["C1", "C2"], policy_set="safewatch", model="m")
    path = cal.save(fitted, tmp_path / f"c{suffix}")
    loaded = cal.load(path)
    assert loaded == fitted
    assert loaded.apply("C2", 0.8) == fitted.apply("C2", 0.8)


def test_bad_files(tmp_path):
    (tmp_path / "a.json").write_text("[1, 2]")
    (tmp_path / "b.json").write_text(json.dumps({"format": cal.FORMAT, "method": "platt",
                                                 "categories": {"C1": {"a": -1, "b": 0}}}))
    (tmp_path / "c.json").write_text("{")
    for name, message in [("a", "not a mapping"), ("b", "a > 0"), ("c", "cannot read"),
                          ("missing", "cannot read")]:
        with pytest.raises(UsageError, match=message):
            cal.load(tmp_path / f"{name}.json")
    with pytest.raises(UsageError, match="method"):
        cal.fit_scaling(np.array([0.5]), np.array([1]), method="isotonic")
    with pytest.raises(UsageError, match="fitted for policy set 'a'"):
        cal.for_policy_set(cal.Calibration("platt", {}, policy_set="a"), "b")


def test_where_files_live(tmp_path):
    policy = tmp_path / "policies" / "safewatch.yaml"
    assert cal.default_path(policy=policy) == tmp_path / "policies/safewatch.calibration.json"
    model = tmp_path / "model"
    model.mkdir()
    assert cal.default_path(model=model, policy_set="safewatch") == \
        model / "calibration/safewatch.json"
    assert cal.discover(policy, model, "safewatch") is None
    cal.save(cal.Calibration("temperature", {}), model / "calibration/safewatch.json")
    assert cal.discover(policy, model, "safewatch") == model / "calibration/safewatch.json"
    cal.save(cal.Calibration("temperature", {}), cal.default_path(policy=policy))
    assert cal.discover(policy, model, "safewatch") == cal.default_path(policy=policy)
    with pytest.raises(UsageError, match="where to store"):
        cal.default_path()


def test_resolve_an_engine_setting(tmp_path):
    policy = tmp_path / "safewatch.yaml"
    assert cal.resolve(None, policy, None, "safewatch") is None
    assert cal.resolve("auto", policy, tmp_path, "safewatch") is None      # nothing stored yet
    stored = cal.Calibration("platt", {"C1": cal.Scaling(2.0, 0.5)}, policy_set="safewatch")
    cal.save(stored, cal.default_path(policy=policy))
    assert cal.resolve("auto", policy, None, "safewatch") == stored
    assert cal.resolve("off", policy, None, "safewatch") is None
    assert cal.resolve(cal.default_path(policy=policy), None, None, "safewatch") == stored
    with pytest.raises(UsageError, match="fitted for policy set 'safewatch'"):
        cal.resolve("auto", policy, None, "weapons")


def test_calibrate_verdict_rederives_flags():
    line = verdict_line("v.mp4", ["C1"], {"C1": 0.6, "C2": 0.3})
    verdict = Verdict.model_validate({k: v for k, v in line.items()
                                      if k not in ("video_path", "labels")})
    c = cal.Calibration("platt", {"C1": cal.Scaling(1.0, -2.0), "C2": cal.Scaling(1.0, 2.0)})
    out = cal.calibrate_verdict(verdict, c)
    assert out.flagged_ids() == ["C2"] and out.flagged
    assert out.scores()["C1"] == pytest.approx(c.apply("C1", 0.6))
    assert out.segments[0].flagged_ids == ["C2"]
    assert out.segments[0].scores["C2"] == pytest.approx(c.apply("C2", 0.3))


def test_bench_calibrate_command(tmp_path):
    preds = tmp_path / "run" / "predictions.jsonl"
    lines, _, labels = write_predictions(preds, 600, seed=3)
    policy = tmp_path / "test.yaml"
    res = CliRunner().invoke(bench_app, ["calibrate", "--predictions", str(preds), "--policy",
                                         str(policy)])
    assert res.exit_code == 0, res.output
    path = tmp_path / "test.calibration.json"
    fitted = cal.load(path)
    assert fitted.policy_set == "test" and fitted.method == "temperature"
    assert fitted.ece_after < fitted.ece_before / 2
    assert f"ECE {fitted.ece_before:.4f} -> {fitted.ece_after:.4f}" in res.stdout
    n_pos = int(labels[:, 0].sum())
    assert f"C1: 600 labelled videos, {n_pos} positive, {600 - n_pos} negative" in res.stdout
    assert "warning" not in res.stderr
    # ten videos: the command says the split is too small
    small = tmp_path / "small" / "predictions.jsonl"
    small.parent.mkdir()
    small.write_text("".join(json.dumps(x) + "\n" for x in lines[:10]))
    res10 = CliRunner().invoke(bench_app, ["calibrate", "--predictions", str(small), "--out",
                                           str(tmp_path / "small.json")])
    assert res10.exit_code == 0 and "warning: only 10 labelled videos" in res10.stderr
    # Scoring with the file applies it: the ECE in metrics.json is the calibrated one.
    res = CliRunner().invoke(bench_app, ["score", "--predictions", str(preds), "--out",
                                         str(tmp_path / "scored"), "--calibration", str(path)])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "scored/metrics.json").read_text())
    assert m["calibration"]["ece"] == pytest.approx(fitted.ece_after, abs=1e-9)
    # calibrated scores are not fitted on again (the fit would be applied to raw scores)
    twice = tmp_path / "twice" / "predictions.jsonl"
    twice.parent.mkdir()
    twice.write_text("".join(json.dumps({**x, "calibrated": n == 3}) + "\n"
                             for n, x in enumerate(lines)))
    res = CliRunner().invoke(bench_app, ["calibrate", "--predictions", str(twice), "--out",
                                         str(tmp_path / "twice.json")])
    assert res.exit_code == 2 and "v3.mp4" in res.output and "raw scores" in res.output
    assert not (tmp_path / "twice.json").exists()


def test_fit_warnings_name_small_splits_unfitted_categories_and_pinned_slopes():
    from guardrail.calibration import A_MIN, fit, fit_warnings

    rng = np.random.default_rng(0)
    n = 12
    labels = np.stack([rng.uniform(size=n) < 0.5, np.zeros(n, bool)], axis=1).astype(int)
    labels[:2, 0] = [0, 1]
    # C1 scores say the opposite of the labels half the time: no signal, the slope hits A_MIN
    scores = np.stack([np.where(rng.uniform(size=n) < 0.5, 0.99, 0.01), np.full(n, 0.3)], axis=1)
    cal = fit(scores, labels, ["C1", "C2"], "temperature")
    got = fit_warnings(cal)
    assert any(w.startswith("only 12 labelled videos") for w in got)
    assert any(w.startswith("C2: not fitted (0 positive, 12 negative") for w in got)
    pinned = [w for w in got if w.startswith("C1: the fitted slope sits at its bound")]
    assert cal.scalings["C1"].a == pytest.approx(A_MIN, rel=0.06) and pinned, got
    # a real split with signal: no warnings
    big = 400
    y = (rng.uniform(size=(big, 1)) < 0.3).astype(int)
    s = np.clip(np.where(y > 0, 0.7, 0.3) + rng.normal(0, 0.1, size=y.shape), 0.01, 0.99)
    assert fit_warnings(fit(s, y, ["C1"], "temperature")) == []


def test_a_calibration_stays_with_the_run_and_out_of_the_shipped_policies(tmp_path, tiny_model):
    """By default it is written beside the predictions; never into guardrail's own policies
    folder; and `--calibration auto` with the shipped set does not look there."""
    from guardrail.engine import GuardEngine
    from guardrail.shipped import shipped

    preds = tmp_path / "run" / "predictions.jsonl"
    _, scores, labels = write_predictions(preds, 200, seed=5)
    res = CliRunner().invoke(bench_app, ["calibrate", "--predictions", str(preds)])
    assert res.exit_code == 0, res.output
    assert cal.load(tmp_path / "run" / "test.calibration.json").policy_set == "test"
    source = shipped("policies", "safewatch.yaml")
    res = CliRunner().invoke(bench_app, ["calibrate", "--predictions", str(preds), "--policy",
                                         str(source)])
    assert res.exit_code == 2 and "own policies folder" in res.output
    assert not source.with_name("safewatch.calibration.json").exists()
    # a file there (written by hand, or by an older version) is not applied to the default set
    planted = source.with_name("safewatch.calibration.json")
    fitted = cal.fit(scores, labels, ["C1", "C2"], "temperature", policy_set="safewatch")
    cal.save(fitted, planted)
    try:
        engine = GuardEngine.from_pretrained(tiny_model(), calibration="auto")
        assert engine.calibration is None
        assert any("calibration auto" in w for w in engine.warnings)
    finally:
        planted.unlink()
