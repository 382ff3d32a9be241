"""Start-up time of the commands that need no model (`--help`, `policy validate`, ...): each
run in a fresh interpreter, as a user's shell runs it; prints a table of median and best wall
times and whether torch was imported.

    .venv/bin/python bench/startup.py [--runs 5] [--before <checkout of an older commit>]

With `--before`, the same commands from that checkout run alternately with this one (the
machine's load hits both alike), for a before/after table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [["--help"], ["policy", "validate", "policies/weapons.yaml"],
            ["policy", "lint", "policies/weapons.yaml"], ["check", "--help"]]
PROBE = """
import sys
sys.argv = ["guardrail", *sys.argv[1:]]
from guardrail.cli import main
try:
    main()
except SystemExit:
    pass
sys.stderr.write("\\ntorch=%s\\n" % ("torch" in sys.modules))
"""


def one(tree: Path, args: list[str]) -> tuple[float, bool]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    got = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=tree, env=env,
                         capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - t0
    return seconds, got.stderr.rstrip().endswith("torch=True")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--before", type=Path, help="an older checkout to compare with")
    args = ap.parse_args(argv)
    trees = {"this": ROOT, **({"before": args.before.resolve()} if args.before else {})}
    times: dict[tuple[str, str], list[float]] = {}
    torch: dict[tuple[str, str], bool] = {}
    for _ in range(args.runs):
        for cmd in COMMANDS:
            for name, tree in trees.items():
                seconds, imported = one(tree, cmd)
                key = (name, " ".join(cmd))
                times.setdefault(key, []).append(seconds)
                torch[key] = imported
    print("| command | tree | median s | best s | torch imported |")
    print("|---|---|---:|---:|---|")
    for (name, cmd), values in times.items():
        print(f"| guardrail {cmd} | {name} | {statistics.median(values):.2f} | "
              f"{min(values):.2f} | {'yes' if torch[(name, cmd)] else 'no'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
