"""bench/gpu_parity.py, the script for the first GPU run, runs on the CPU (`--small`) and
fails when a check's difference is over its tolerance."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def parity():
    spec = importlib.util.spec_from_file_location("gpu_parity", ROOT / "bench" / "gpu_parity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_parity"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_every_check_passes_on_the_cpu(parity, capsys):
    assert parity.main(["--small"]) == 0
    table = capsys.readouterr().out
    names = ("vision", "ragged", "explain", "bf16", "flex", "resize", "fold")
    for name in names:
        assert f"| {name} |" in table
    assert table.count("| pass |") == len(names), table


def test_a_difference_over_the_tolerance_fails(parity, capsys, monkeypatch):
    real = parity.check_ragged

    def off(*args):
        return real(*args) + 1e-3            # what a wrong kernel would add (tolerance 1e-4)
    monkeypatch.setattr(parity, "CHECKS", [(n, off if n == "ragged" else c, t, w)
                                           for n, c, t, w in parity.CHECKS])
    assert parity.main(["--small", "--only", "ragged"]) == 1
    assert "| FAIL |" in capsys.readouterr().out
