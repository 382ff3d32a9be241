"""Files shipped with guardrail: the policy sets and the deploy files.

Their source is the repository's top-level `policies/` and `deploy/` folders; a built wheel
installs them as the data packages `guardrail.policies` and `guardrail.deploy` (pyproject.toml
maps the folders). A source checkout or an editable install reads the folders themselves.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

KINDS = ("policies", "deploy")


def shipped_dir(kind: str) -> Path:
    """The folder holding the shipped `kind` files ("policies" or "deploy")."""
    assert kind in KINDS, f"nothing shipped as {kind!r}"
    try:
        spec = importlib.util.find_spec(f"guardrail.{kind}")
    except ModuleNotFoundError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parent.parent / kind


def shipped(kind: str, name: str) -> Path:
    """One shipped file, e.g. shipped("policies", "safewatch.yaml")."""
    return shipped_dir(kind) / name
