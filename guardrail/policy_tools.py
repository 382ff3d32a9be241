"""Policy authoring tools that need no model: the JSON Schema of the policy YAML and a semantic
diff of two policy sets (by category id; reordering is no change, as parallel encoding makes it
none for the verdicts)."""

from __future__ import annotations

from typing import Any

from guardrail.policy import Category, PolicySet


def schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a policy file, from the same models that load it."""
    out = PolicySet.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **out,
            "title": "guardrail policy set"}


def _fields(old: PolicySet, a: Category, new: PolicySet, b: Category) -> list[str]:
    """Fields of a category that differ; `threshold` compares the effective values (a changed
    set default changes every category that inherits it)."""
    changed = [name for name in Category.model_fields
               if name != "threshold" and getattr(a, name) != getattr(b, name)]
    if old.threshold_of(a) != new.threshold_of(b):
        changed.append("threshold")
    return changed


def diff(old: PolicySet, new: PolicySet) -> dict[str, Any]:
    """{"added": [ids], "removed": [ids], "changed": [{"id", "fields"}]}, ids in file order."""
    before = {c.id: c for c in old.categories}
    after = {c.id: c for c in new.categories}
    changed = []
    for c in new.categories:
        if c.id in before:
            fields = _fields(old, before[c.id], new, c)
            if fields:
                changed.append({"id": c.id, "fields": fields})
    return {"added": [c.id for c in new.categories if c.id not in before],
            "removed": [c.id for c in old.categories if c.id not in after],
            "changed": changed}
