"""`guardrail policy schema` and `guardrail policy diff`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator
from typer.testing import CliRunner

from guardrail.cli import app
from guardrail.errors import PolicyError
from guardrail.policy import load_policy, load_policy_text
from guardrail.policy_tools import diff, schema

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "policies").glob("*.yaml"))


def _validator():
    got = CliRunner().invoke(app, ["policy", "schema"])
    assert got.exit_code == 0
    assert json.loads(got.stdout) == schema()
    Draft202012Validator.check_schema(schema())
    return Draft202012Validator(schema())


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_set_validates_against_the_schema(path):
    errors = list(_validator().iter_errors(yaml.safe_load(path.read_text())))
    assert not errors, [e.message for e in errors]


GOOD = {"name": "s", "version": 1, "categories": [{"id": "C1", "name": "A", "blocked": ["x"]}]}
BAD = {
    "threshold above 1": {"categories": [{"id": "C1", "name": "A", "blocked": ["x"],
                                          "threshold": 1.5}]},
    "threshold 0": {"defaults": {"threshold": 0}},
    "unknown key": {"owner": "me"},
    "no blocked rules": {"categories": [{"id": "C1", "name": "A", "blocked": []}]},
    "id with a space": {"categories": [{"id": "C 1", "name": "A", "blocked": ["x"]}]},
    "quote in a name": {"categories": [{"id": "C1", "name": 'A"B', "blocked": ["x"]}]},
    "blank rule": {"categories": [{"id": "C1", "name": "A", "blocked": ["  "]}]},
    "no categories": {"categories": []},
    "version as text": {"version": "1"},
    "bad severity": {"categories": [{"id": "C1", "name": "A", "blocked": ["x"],
                                     "severity": "extreme"}]},
}


@pytest.mark.parametrize("why", list(BAD))
def test_invalid_documents_fail_the_schema_and_the_loader_alike(why):
    doc = {**GOOD, **BAD[why]}
    assert list(_validator().iter_errors(doc)), why
    with pytest.raises(PolicyError):
        load_policy_text(yaml.safe_dump(doc))
    assert not list(_validator().iter_errors(GOOD))
    load_policy_text(yaml.safe_dump(GOOD))


def _edited(tmp_path: Path, name: str, change) -> Path:
    doc = yaml.safe_load((ROOT / "policies" / "safewatch.yaml").read_text())
    change(doc)
    out = tmp_path / name
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def test_diff_by_category_id(tmp_path):
    base = ROOT / "policies" / "safewatch.yaml"
    reordered = _edited(tmp_path, "r.yaml", lambda d: d["categories"].reverse())
    assert diff(load_policy(base), load_policy(reordered)) == {
        "added": [], "removed": [], "changed": []}

    def edit(d):
        d["categories"][0]["threshold"] = 0.7
        d["categories"][1]["blocked"].append("Something new.")
        del d["categories"][2]
        d["categories"].append({"id": "C9", "name": "New", "blocked": ["x"]})
    got = diff(load_policy(base), load_policy(_edited(tmp_path, "e.yaml", edit)))
    assert got == {"added": ["C9"], "removed": ["C3"],
                   "changed": [{"id": "C1", "fields": ["threshold"]},
                               {"id": "C2", "fields": ["blocked"]}]}

    def default(d):
        d["defaults"] = {"threshold": 0.6}
    inherited = diff(load_policy(base), load_policy(_edited(tmp_path, "d.yaml", default)))
    ids = [c.id for c in load_policy(base).categories if c.threshold is None]
    assert [c["id"] for c in inherited["changed"]] == ids
    cli = CliRunner().invoke(app, ["policy", "diff", str(base), str(tmp_path / "e.yaml")])
    assert cli.exit_code == 0
    assert cli.stdout.splitlines()[:2] == ["+ C9 (New)", "- C3 (Threats, Violence & Harm)"]
    same = CliRunner().invoke(app, ["policy", "diff", str(base), str(reordered), "--json"])
    assert json.loads(same.stdout) == {"added": [], "removed": [], "changed": []}


def _lint(*args):
    return CliRunner().invoke(app, ["policy", "lint", *map(str, args)])


def test_lint_counts_with_the_models_tokenizer_against_its_context(tiny_model):
    from transformers import AutoTokenizer

    from guardrail.prompt import build_prompt

    model = tiny_model()
    got = _lint(ROOT / "policies" / "safewatch.yaml", "--model", model, "--json")
    assert got.exit_code == 0, got.output
    (report,) = json.loads(got.stdout)["files"]
    assert set(report) == {"file", "categories", "prompt_tokens", "context", "warnings",
                           "errors"}
    tok = AutoTokenizer.from_pretrained(model)
    chunks = build_prompt(load_policy(ROOT / "policies" / "safewatch.yaml")).chunks
    assert [c["tokens"] for c in report["categories"]] == [
        len(tok.encode(c, add_special_tokens=False)) for c in chunks]
    assert report["context"] == 32768 and report["errors"] == []
    assert set(report["prompt_tokens"]) == {"sequential", "parallel", "parallel_cached",
                                               "isolated"}
    assert min(report["prompt_tokens"].values()) > sum(c["tokens"] for c in report["categories"])
    table = _lint(ROOT / "policies" / "safewatch.yaml")             # no model: an estimate
    assert table.exit_code == 0 and "an estimate" in table.stdout


def test_lint_warns_on_what_an_author_can_fix_and_fails_what_cannot_fit(tmp_path,
                                                                         small_context_model):
    long_rule = "Footage that shows a very particular situation in a lot of detail. " * 12
    policy = tmp_path / "p.yaml"
    policy.write_text(yaml.safe_dump({"name": "p", "version": 1, "categories": [
        {"id": "C1", "name": "Violence", "blocked": ["Fighting.", "Graphic injuries."],
         "allowed": ["Sports."]},
        {"id": "C2", "name": "Weapons", "blocked": ["Fighting.", "Guns shown in news footage."]},
        {"id": "C3", "name": "Long", "blocked": [long_rule], "allowed": ["x"]},
        {"id": "C4", "name": "Strict", "blocked": ["Nudity."], "allowed": ["Art."],
         "threshold": 0.9}]}))
    got = _lint(policy, "--json")
    assert got.exit_code == 0
    warnings = json.loads(got.stdout)["files"][0]["warnings"]
    assert [w.split(":")[0] for w in warnings] == ["C3", "C2", "C2", "C4"], warnings
    assert "parallel layouts" in warnings[0] and "repeats one of C1" in warnings[1]
    assert "mention news" in warnings[2] and "far from the set's default" in warnings[3]
    clean = _lint(ROOT / "policies" / "safewatch.yaml", "--json")
    assert json.loads(clean.stdout)["files"][0]["warnings"] == []
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: b\nversion: 1\ncategories:\n  - {id: C1, name: A, threshold: 2}\n")
    invalid = _lint(bad, "--json")
    assert invalid.exit_code == 2
    assert json.loads(invalid.stdout)["files"][0]["errors"][0].startswith(f"{bad}:4:")
    too_long = _lint(ROOT / "policies" / "safewatch.yaml", "--model", small_context_model(512))
    assert too_long.exit_code == 2 and "context is 512 tokens" in too_long.stderr


def test_policy_test_reports_examples_metrics_and_changes(tmp_path, tiny_model, video_files):
    from guardrail.engine import GuardEngine

    manifest = tmp_path / "examples.jsonl"
    rows = [{"video": str(video_files["mp4_h264"]), "labels": ["C1"]},
            {"video": str(video_files["webm_vp9"]), "labels": []},
            {"video": str(video_files["avi_mjpeg"]), "labels": ["C1", "C3"]},
            {"video": str(tmp_path / "gone.mp4"), "labels": []}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ROOT / "policies" / "safewatch.yaml"
    reordered = _edited(tmp_path, "r.yaml", lambda d: d["categories"].reverse())

    def lower(d):
        d["defaults"] = {"threshold": 0.01}
    everything = _edited(tmp_path, "all.yaml", lower)
    model = tiny_model()

    def run(*extra):
        got = CliRunner().invoke(app, ["policy", "test", str(base), "--examples", str(manifest),
                                       "--model", str(model), "--json", *map(str, extra)])
        assert got.exit_code == 0, got.output
        return json.loads(got.stdout)

    report = run("--against", reordered)
    engine = GuardEngine.from_pretrained(model, policies=str(base))
    for row, example in zip(rows[:3], report["examples"], strict=False):
        assert example["labels"] == row["labels"]
        assert example["flagged_ids"] == engine.check(row["video"]).flagged_ids()
    assert report["examples"][3]["flagged_ids"] is None and report["examples"][3]["error"]
    judged = report["examples"][:3]
    for cid, m in report["per_category"].items():
        tp = sum(cid in e["labels"] and cid in e["flagged_ids"] for e in judged)
        fp = sum(cid not in e["labels"] and cid in e["flagged_ids"] for e in judged)
        assert (m["tp"], m["fp"]) == (tp, fp)
        assert m["precision"] == (tp / (tp + fp) if tp + fp else None)
    assert report["changed"] == []                       # reordering changes no verdict
    assert any(w.startswith("random test model") for w in report["warnings"])
    changed = run("--against", everything)["changed"]     # everything flagged before
    assert changed and all(set(c["after"]) < set(c["before"]) for c in changed)


def test_the_guides_worked_example_runs_as_written(tmp_path, tiny_model, video_files):
    """Every shell line of docs/policies.md's worked example, run in a copy of the repository
    layout with /tmp/m standing for the tiny model."""
    import re
    import shlex
    import shutil
    import subprocess
    import sys

    guide = (ROOT / "docs" / "policies.md").read_text()
    section = guide[guide.index("## Worked example"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    (tmp_path / "policies").mkdir()
    shutil.copy(ROOT / "policies" / "weapons.yaml", tmp_path / "policies")
    (tmp_path / "examples.jsonl").write_text("".join(
        json.dumps({"video": str(video_files[f]), "labels": labels}) + "\n"
        for f, labels in (("mp4_h264", ["W5"]), ("webm_vp9", []))))
    outputs = []
    for line in block.strip().splitlines():
        line = line.replace("/tmp/m", str(tiny_model()))
        argv = shlex.split(line)
        if argv[0] == "guardrail":
            argv = [sys.executable, "-c", "from guardrail.cli import main; main()", *argv[1:]]
        got = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert got.returncode == 0, (line, got.stderr[-2000:])
        outputs.append(got.stdout)
    assert load_policy(tmp_path / "my_weapons.yaml").version == 2
    assert any(re.search(r"~ W5 \(.*\): threshold", out) for out in outputs)
