"""The user docs say what the code does: generated pages are current, every `guardrail ...`
command line in the README and docs/ uses flags that exist, and nothing a user reads cites the
internal spec."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from guardrail import docgen
from guardrail.cli import app

ROOT = Path(__file__).resolve().parents[1]
USER_DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "deploy").iterdir()), *sorted((ROOT / "policies").glob("*.yaml"))]


@pytest.mark.parametrize("page, render", [("docs/cli.md", docgen.reference),
                                          ("docs/verdict.md", docgen.verdict_reference)])
def test_generated_pages_are_current(page, render):
    assert (ROOT / page).read_text() == render() + "\n", (
        f"{page} is stale: python -m guardrail.docgen{' --verdict' if 'verdict' in page else ''}"
        f" > {page}")


def test_readme_command_table_is_generated_from_help():
    text = (ROOT / "README.md").read_text()
    block = text[text.index(docgen.README_BEGIN): text.index(docgen.README_END)
                 + len(docgen.README_END)]
    assert block == docgen.readme_table()
    listed = re.findall(r"^\| `(guardrail [a-z -]+)` \|", block, re.M)
    assert listed == [name for name, _ in docgen.commands()]


def test_command_lines_in_the_docs_use_real_flags():
    known = {name: {o for p in cmd.params if p.param_type_name == "option" for o in p.opts}
             for name, cmd in docgen.commands()}
    checked = 0
    for doc in USER_DOCS:
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            for use in re.findall(r"(guardrail [a-z][a-z -]*[a-z])([^|`#]*)", line):
                words = use[0].split()
                name = next((" ".join(words[:k]) for k in (3, 2) if " ".join(words[:k]) in known),
                            None)
                if name is None:
                    continue
                flags = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", use[0] + use[1]))
                bad = flags - known[name] - {"--help"}
                assert not bad, f"{doc.name}:{n}: {name} has no {', '.join(sorted(bad))}"
                checked += 1
    assert checked > 20


def test_no_user_text_cites_the_internal_spec():
    for doc in USER_DOCS:
        assert "SPEC" not in doc.read_text(), doc
    runner = CliRunner()
    for name, _ in docgen.commands():
        got = runner.invoke(app, [*name.split()[1:], "--help"], terminal_width=200)
        assert got.exit_code == 0 and "SPEC" not in got.stdout, name


def _bash_block(text: str, heading: str, nth: int = 0) -> list[str]:
    section = text[text.index(heading):]
    return re.findall(r"```bash\n(.*?)```", section, re.S)[nth].strip().splitlines()


@pytest.mark.slow
def test_the_readmes_quickstart_and_evaluation_run_as_written(tmp_path, tiny_model):
    """The README's quickstart, then its evaluation block, line by line in one fresh folder
    (the files one creates are what the next reads), with the tiny model at /tmp/m and
    /tmp/skv in the test's folder."""
    import os
    import subprocess
    import sys

    readme = (ROOT / "README.md").read_text()
    lines = [*_bash_block(readme, "## Quickstart"), *_bash_block(readme, "## Offline evaluation")]
    venv = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{venv}{os.pathsep}{os.environ['PATH']}"}
    model = tiny_model()
    for line in lines:
        if line.startswith(". ") or "make-tiny /tmp/m" in line:
            continue                        # the test's venv is active; the model is made
        line = line.replace("/tmp/skv", str(tmp_path / "skv")).replace("/tmp/m", str(model))
        line = line.replace("pip download", f"{sys.executable} -m pip download")
        got = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)
        assert got.returncode == 0, (line, got.stdout[-1000:], got.stderr[-2000:])
    assert (tmp_path / "clip.mp4").stat().st_size > 0
    assert (tmp_path / "out" / "val" / "safewatch.calibration.json").is_file()
    assert "random test model" in (tmp_path / "out" / "val" / "report.md").read_text()
