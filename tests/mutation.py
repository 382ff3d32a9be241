"""Mutation testing of the scoring core: does some test fail when the code is wrong?

    .venv/bin/python tests/mutation.py                  # every mutant, summary table
    .venv/bin/python tests/mutation.py --list           # what would run
    .venv/bin/python tests/mutation.py --only named     # the hand-written faults only
    .venv/bin/python tests/mutation.py --match pruning  # mutants whose name contains "pruning"

Two kinds of mutant, each applied alone to a copy of the package in a temporary directory:

- **named faults** (`NAMED`): bugs we know a refactor could bring, e.g. a score that is P(false),
  swapped answer ids, pruning that keeps the least relevant tokens, explain mode that writes
  nothing;
- **operator mutants**: every comparison, arithmetic and boolean operator, small integer
  constant, `min`/`max`-style name and unary operator inside the functions listed in `TARGETS`,
  changed one at a time (the module is re-printed with `ast.unparse`).

Each mutant runs the fast engine tests (`TESTS`, stopping at the first failure, on the
qwen2_5_vl and internvl tiny models) and is *killed* when a test fails or the suite times out;
a mutant that every test passes *survived*. Results go to a JSON file (`--out`) as they come,
so an interrupted run can be read and resumed (`--resume`).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# file -> functions (or Class.method) whose bodies are mutated; None: every function in the file
TARGETS: dict[str, tuple[str, ...] | None] = {
    "guardrail/probes.py": None,
    "guardrail/pruning.py": None,
    "guardrail/layout.py": ("text_segment", "concat", "plan", "build_groups", "visibility",
                            "additive_mask", "Visibility.visible", "Visibility.mask_mod",
                            "Visibility._packed"),
    "guardrail/decode.py": None,
}

# (name, file, exact text, replacement); the text must occur exactly once in the file
NAMED: list[tuple[str, str, str, str]] = [
    ("score-is-p-false", "guardrail/probes.py",
     "return torch.softmax(pair.float(), dim=-1)[..., 0]",
     "return torch.softmax(pair.float(), dim=-1)[..., 1]"),
    ("answer-ids-swapped", "guardrail/probes.py",
     "return AnswerTokens(true_id, false_id)", "return AnswerTokens(false_id, true_id)"),
    ("pruning-keeps-least-relevant", "guardrail/pruning.py",
     "order = torch.sort(rel, dim=1, descending=True, stable=True).indices",
     "order = torch.sort(rel, dim=1, descending=False, stable=True).indices"),
    ("explain-generates-nothing", "guardrail/decode.py",
     "if len(row.out) < row.budget and not ending(best[b]):",
     "if len(row.out) < 0 and not ending(best[b]):"),
    ("probe-logit-off-by-one", "guardrail/engine.py",
     'span(f"R{i}").stop - 1 - first', 'span(f"R{i}").stop - 2 - first'),
    ("window-scores-mean-not-max", "guardrail/engine.py",
     "torch.stack([r.scores for r in rs]).amax(dim=0)",
     "torch.stack([r.scores for r in rs]).mean(dim=0)"),
    ("chunks-see-each-other", "guardrail/layout.py",
     "return (((kg < qg) | ", "return (((kg <= qg) | "),
    ("flex-chunks-see-each-other", "guardrail/layout.py",
     "earlier = (kc >> 42) < (qc >> 42)", "earlier = (kc >> 42) <= (qc >> 42)"),
    ("relevance-from-wrong-direction", "guardrail/prefill.py",
     'if lay.span("V").start < lay.span("P0").start:',
     'if lay.span("V").start > lay.span("P0").start:'),
    ("explain-from-worst-window", "guardrail/engine.py",
     "top > best[i][0]", "top < best[i][0]"),
    ("pre-prefill-negated-similarity", "guardrail/pruning.py",
     "return torch.nn.functional.normalize(p, dim=-1) @ v.T",
     "return -(torch.nn.functional.normalize(p, dim=-1) @ v.T)"),
    ("causal-claimed-with-padding", "guardrail/runner.py",
     "causal=solo and not padded)", "causal=solo)"),
    ("answer-positions-restart", "guardrail/runner.py",
     "self._next_pos[b] += len(row)", "self._next_pos[b] += 0"),
    ("probe-head-wrong-row", "guardrail/engine.py",
     "scores = [self._calibrated(s) for s in probe_scores(pair).cpu()]",
     "scores = [self._calibrated(s) for s in probe_scores(pair.flip(-1)).cpu()]"),
]

# file -> the fast tests that can see a fault in it, cheapest first (a run stops at the first
# failure, so killed mutants cost seconds; survivors pay for the whole list)
_SCORE = ["tests/test_reference.py::score or logits or tokens", "tests/test_engine.py"]
TESTS: dict[str, list[str]] = {
    "guardrail/probes.py": ["tests/test_probes.py", *_SCORE],
    "guardrail/pruning.py": ["tests/test_pruning.py", "tests/test_reference.py::pruning"],
    "guardrail/layout.py": ["tests/test_layout.py", *_SCORE, "tests/test_runner.py::causal"],
    "guardrail/decode.py": ["tests/test_reference.py::greedy", "tests/test_batches.py::explain",
                            "tests/test_runner.py::decodes"],
    "guardrail/prefill.py": ["tests/test_reference.py::pruning", "tests/test_prefill.py::quarter"],
    "guardrail/runner.py": ["tests/test_runner.py", "tests/test_batches.py::ragged or explain",
                            "tests/test_reference.py::greedy"],
    "guardrail/engine.py": [*_SCORE, "tests/test_reference.py::window"],
}
FAMILIES_K = "not qwen2_vl and not qwen3_vl"     # two families keep a run short


_COMPARE = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
            ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In,
            ast.Is: ast.IsNot, ast.IsNot: ast.Is}
_BINARY = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
           ast.FloorDiv: ast.Mult, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd,
           ast.Mod: ast.FloorDiv}
_BOOL = {ast.And: ast.Or, ast.Or: ast.And}
_NAMES = {"max": "min", "min": "max", "amax": "amin", "amin": "amax", "argmax": "argmin",
          "any": "all", "all": "any", "clamp_min": "clamp_max"}


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    source: str            # the whole mutated file


def _functions(tree: ast.Module, wanted: tuple[str, ...] | None) -> list[ast.AST]:
    out = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if wanted is None or node.name in wanted:
                out.append(node)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                        wanted is None or f"{node.name}.{item.name}" in wanted):
                    out.append(item)
    return out


def _skipped(fn: ast.AST) -> set[int]:
    """ids of nodes not worth mutating: docstrings, assert and raise statements (messages),
    f-strings, type annotations."""
    skip: set[int] = set()
    for node in ast.walk(fn):
        if isinstance(node, (ast.Assert, ast.Raise, ast.JoinedStr)):
            skip.update(id(n) for n in ast.walk(node))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for a in [*node.args.args, *node.args.kwonlyargs]:
                if a.annotation is not None:
                    skip.update(id(n) for n in ast.walk(a.annotation))
            if node.returns is not None:
                skip.update(id(n) for n in ast.walk(node.returns))
        if isinstance(node, ast.AnnAssign):
            skip.update(id(n) for n in ast.walk(node.annotation))
    return skip


def _edits(node: ast.AST) -> list[tuple[str, callable]]:
    """(label, apply) pairs for one node; apply() mutates the node in place and returns undo."""
    out = []

    def swap(obj, attr, new):
        old = getattr(obj, attr)

        def apply():
            setattr(obj, attr, new)
            return lambda: setattr(obj, attr, old)
        return apply

    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in _COMPARE:
                ops = list(node.ops)
                ops[i] = _COMPARE[type(op)]()
                out.append((f"{type(op).__name__}->{type(ops[i]).__name__}",
                            swap(node, "ops", ops)))
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        new = _BINARY[type(node.op)]()
        out.append((f"{type(node.op).__name__}->{type(new).__name__}", swap(node, "op", new)))
    elif isinstance(node, ast.BoolOp):
        new = _BOOL[type(node.op)]()
        out.append((f"{type(node.op).__name__}->{type(new).__name__}", swap(node, "op", new)))
    elif isinstance(node, ast.Constant) and type(node.value) in (bool, int):
        if isinstance(node.value, bool):
            out.append((f"{node.value}->{not node.value}", swap(node, "value", not node.value)))
        else:
            new = {0: 1, 1: 0}.get(node.value, node.value + 1)
            out.append((f"{node.value}->{new}", swap(node, "value", new)))
    elif isinstance(node, ast.Name) and node.id in _NAMES:
        out.append((f"{node.id}->{_NAMES[node.id]}", swap(node, "id", _NAMES[node.id])))
    elif isinstance(node, ast.Attribute) and node.attr in _NAMES:
        out.append((f".{node.attr}->.{_NAMES[node.attr]}",
                    swap(node, "attr", _NAMES[node.attr])))
    return out


def operator_mutants(file: str, wanted: tuple[str, ...] | None) -> list[Mutant]:
    text = (ROOT / file).read_text()
    tree = ast.parse(text)
    mutants, seen = [], set()
    for fn in _functions(tree, wanted):
        skip = _skipped(fn)
        for node in ast.walk(fn):
            if id(node) in skip:
                continue
            # `-x` -> `x`: unary minus, `~`, `not` dropped
            parent_edits = []
            for field, value in ast.iter_fields(node):
                if isinstance(value, ast.UnaryOp) and id(value) not in skip:
                    parent_edits.append((field, value))
            for label, apply in _edits(node):
                undo = apply()
                src = ast.unparse(tree)
                undo()
                name = f"{file}:{fn.name}:{getattr(node, 'lineno', 0)}:{label}"
                if src not in seen:
                    seen.add(src)
                    mutants.append(Mutant(name, file, src))
            for field, unary in parent_edits:
                setattr(node, field, unary.operand)
                src = ast.unparse(tree)
                setattr(node, field, unary)
                name = f"{file}:{fn.name}:{unary.lineno}:drop-{type(unary.op).__name__}"
                if src not in seen:
                    seen.add(src)
                    mutants.append(Mutant(name, file, src))
    names: dict[str, int] = {}                 # two mutants on one line: name them apart
    for i, m in enumerate(mutants):
        names[m.name] = names.get(m.name, 0) + 1
        if names[m.name] > 1:
            mutants[i] = Mutant(f"{m.name}#{names[m.name]}", m.file, m.source)
    return mutants


def named_mutants() -> list[Mutant]:
    out = []
    for name, file, old, new in NAMED:
        text = (ROOT / file).read_text()
        assert text.count(old) == 1, f"{name}: {old!r} occurs {text.count(old)} times in {file}"
        out.append(Mutant(f"named:{name}", file, text.replace(old, new)))
    return out


def snapshot(work: Path) -> Path:
    """The code and tests as they are now, so edits made during a long run change nothing."""
    pristine = work / "pristine"
    ignore = shutil.ignore_patterns("__pycache__", ".cache")
    for part in ("guardrail", "tests", "policies"):
        shutil.copytree(ROOT / part, pristine / part, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", pristine / "pyproject.toml")
    return pristine


def run(mutant: Mutant | None, files: str, pristine: Path, timeout_s: float
        ) -> tuple[str, str, float]:
    """Run the tests of `files` (a TESTS key) against `mutant` (None: the unmutated code).
    Returns (outcome, the first failing test or '', seconds); outcome is killed, survived or
    timeout."""
    work = pristine.parent / "run"
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(pristine, work, symlinks=True)
    if mutant is not None:
        (work / mutant.file).write_text(mutant.source)
    env = dict(os.environ, PYTHONPATH=str(work), PYTHONDONTWRITEBYTECODE="1")
    where = subprocess.run([sys.executable, "-c", "import guardrail; print(guardrail.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True).stdout.strip()
    assert where.startswith(str(work)), f"tests would import {where}, not the mutated copy"
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
    total = 0.0
    for test in TESTS[files]:
        path, _, words = test.partition("::")        # "file::word": tests whose name has word
        select = f"({FAMILIES_K}) and ({words})" if words else FAMILIES_K
        outcome, failed, seconds = _pytest([*cmd, "-k", select, path], work, env,
                                           timeout_s - total)
        total += seconds
        if outcome != "survived":
            return outcome, failed, total
    return "survived", "", total


def _pytest(cmd: list[str], work: Path, env: dict, timeout_s: float) -> tuple[str, str, float]:
    t0 = time.monotonic()
    if timeout_s <= 0:
        return "timeout", "", 0.0
    try:
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return "timeout", "", time.monotonic() - t0
    seconds = time.monotonic() - t0
    failed = next((line.split(" ")[1] for line in proc.stdout.splitlines()
                   if line.startswith(("FAILED ", "ERROR "))), "")
    if proc.returncode == 5:
        raise SystemExit(f"no tests selected by {' '.join(cmd[-3:])}: fix TESTS")
    if proc.returncode not in (0, 1) and not failed:    # collection or import error
        failed = (proc.stdout.strip().splitlines() or ["?"])[-1]
    return ("survived" if proc.returncode == 0 else "killed"), failed, seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["named", "operators"], default=None)
    ap.add_argument("--match", default="", help="run mutants whose name contains this")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / ".cache" / "mutation.json")
    ap.add_argument("--resume", action="store_true", help="skip mutants already in --out")
    ap.add_argument("--timeout", type=float, default=0.0,
                    help="seconds per mutant (default: 3x the unmutated run)")
    args = ap.parse_args()

    mutants = [] if args.only == "operators" else named_mutants()
    if args.only != "named":
        for file, wanted in TARGETS.items():
            mutants += operator_mutants(file, wanted)
    mutants = [m for m in mutants if args.match in m.name]
    if args.list:
        for m in mutants:
            print(m.name)
        print(f"{len(mutants)} mutants", file=sys.stderr)
        return 0
    results = json.loads(args.out.read_text()) if args.resume and args.out.exists() else {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="guardrail-mutation-") as tmp:
        pristine = snapshot(Path(tmp))
        timeouts: dict[str, float] = {}
        print(f"{len(mutants)} mutants", flush=True)
        for i, m in enumerate(mutants, 1):
            if m.name in results:
                continue
            if m.file not in timeouts:         # the unmutated code must pass the same tests
                outcome, failed, base_s = run(None, m.file, pristine, timeout_s=3600)
                if outcome != "survived":
                    print(f"the unmutated code fails its tests ({failed}); fix that first")
                    return 2
                timeouts[m.file] = args.timeout or 3 * base_s + 30
                print(f"baseline {m.file}: tests pass in {base_s:.0f} s", flush=True)
            outcome, failed, seconds = run(m, m.file, pristine, timeouts[m.file])
            results[m.name] = {"outcome": outcome, "failed": failed, "seconds": round(seconds)}
            args.out.write_text(json.dumps(results, indent=1))
            print(f"[{i}/{len(mutants)}] {outcome:8s} {seconds:5.0f}s {m.name}  {failed}",
                  flush=True)
    return summarise(results)


def summarise(results: dict) -> int:
    by_file: dict[str, list[str]] = {}
    for name, r in results.items():
        key = "named faults" if name.startswith("named:") else name.split(":")[0]
        by_file.setdefault(key, []).append(r["outcome"])
    print("\n| mutants of | killed | survived | score |\n|---|---:|---:|---:|")
    total_k = total = 0
    for key, outs in sorted(by_file.items()):
        k = sum(o != "survived" for o in outs)
        total_k, total = total_k + k, total + len(outs)
        print(f"| {key} | {k} | {len(outs) - k} | {k / len(outs):.0%} |")
    print(f"| all | {total_k} | {total - total_k} | {total_k / max(total, 1):.0%} |")
    survivors = [n for n, r in results.items() if r["outcome"] == "survived"]
    if survivors:
        print("\nsurvived:\n" + "\n".join(f"  {n}" for n in survivors))
    return 0


if __name__ == "__main__":
    sys.exit(main())
