"""Policy sets: the policy YAML as frozen pydantic models, a safe loader, and policy chunks.

`load_policy(path)` reads one policy set. Loading composes the YAML node tree with a SafeLoader
(no object construction), builds plain Python values and a map from key paths such as
`("categories", 3, "threshold")` to 1-based line numbers while walking it, then validates with
pydantic. Every problem in a file is reported at once, sorted by line, as one `PolicyError` whose
messages read `policies/x.yaml:12: categories[3].threshold: must be in (0, 1)`.

`render_chunk(category)` turns a category into its policy chunk: one SafeWatch-style
`<box>…</box>` block, the unit the engine encodes in parallel.
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from guardrail.errors import PolicyError
from guardrail.yaml_lines import MAP_TAG, KeyPath, Walker, compose, format_path

MAX_POLICY_BYTES = 1 << 20  # 1 MiB, checked before parsing
MAX_CATEGORIES = 64
MAX_VERSION = 2**31 - 1   # fits a PostgreSQL integer column
MAX_MESSAGES = 100



def _one_line(value: str) -> str:
    value = " ".join(value.split())
    if not value:
        raise ValueError("must not be empty")
    return value


def _check_name(value: str) -> str:
    if '"' in value or "\\" in value:
        raise ValueError("must not contain '\"' or '\\' (it is written inside a JSON key)")
    hidden = sorted({f"U+{ord(ch):04X}" for ch in value
                     if unicodedata.category(ch) in ("Cc", "Cf")})
    if hidden:   # zero-width and bidi controls make look-alike names
        raise ValueError(f"must not contain invisible or direction characters "
                         f"({', '.join(hidden)})")
    return value


def name_key(name: str) -> str:
    """What makes two category names the same: NFKC-normalised, case-folded, whitespace runs
    as one space and none at the ends (as a name is stored). Outputs keyed by name
    (`/v1/moderations`) must never merge two categories."""
    return " ".join(unicodedata.normalize("NFKC", name).casefold().split())


def _check_threshold(value: float) -> float:
    if not 0.0 < value < 1.0:
        raise ValueError("must be in (0, 1)")
    return value


# the JSON Schema says what the validators check (`guardrail policy schema`)
Text = Annotated[str, AfterValidator(_one_line),
                 WithJsonSchema({"type": "string", "pattern": r"\S"})]
Threshold = Annotated[float, AfterValidator(_check_threshold),
                      WithJsonSchema({"type": "number", "exclusiveMinimum": 0,
                                      "exclusiveMaximum": 1})]


class _Model(BaseModel):
    # strict: YAML gives real types; "1" for an int or 1.5 for a version is an author's mistake.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class PolicyExample(_Model):
    """A few-shot text example attached to a category."""

    text: Text = Field(description="A short description of content.")
    violates: bool = Field(description="Whether that content violates the category.")


class Category(_Model):
    """One harmful category; renders to exactly one policy chunk."""

    id: str = Field(
        pattern=r"^[A-Za-z0-9_-]{1,32}$",
        description="Identifier, unique within the set, e.g. C1; used in JSON keys and outputs.",
    )
    name: Annotated[Text, AfterValidator(_check_name),
                    WithJsonSchema({"type": "string",
                                    "pattern": r'^[^"\\]*[^"\\\s][^"\\]*$'})] = Field(
        description="Human-readable name shown in prompts and outputs, e.g. Sexual Content."
    )
    core_value: Text | None = Field(None, description="Optional one-sentence intent.")
    blocked: list[Text] = Field(min_length=1, description="Rules: what violates the category.")
    allowed: list[Text] = Field(
        default_factory=list, description="Rules: look-alikes that do not violate it."
    )
    threshold: Threshold | None = Field(
        None, description="Score at or above which the category is flagged; overrides defaults."
    )
    severity: Literal["low", "medium", "high"] | None = Field(
        None, description="How serious a violation is, for downstream triage."
    )
    examples: list[PolicyExample] = Field(
        default_factory=list, description="Optional few-shot text examples."
    )


class Defaults(_Model):
    """Set-wide defaults."""

    threshold: Threshold = Field(0.5, description="Score at or above which a category is flagged.")


class PolicySet(_Model):
    """One policy file: a named, versioned list of categories."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", description="Policy set id.")
    version: int = Field(ge=1, le=MAX_VERSION, description="Integer version of the set, 1 to "
                         "2^31-1.")
    description: str | None = Field(None, description="Optional free text.")
    defaults: Defaults = Field(default_factory=Defaults, description="Set-wide defaults.")
    categories: list[Category] = Field(
        min_length=1, max_length=MAX_CATEGORIES, description="1..64 categories with unique ids."
    )

    @model_validator(mode="after")
    def _unique_ids(self) -> PolicySet:
        first: dict[str, int] = {}
        names: dict[str, int] = {}
        for i, category in enumerate(self.categories):
            if category.id in first:
                raise PydanticCustomError(
                    "duplicate_id",
                    "duplicate id '{id}' (first at categories[{first}])",
                    {"id": category.id, "first": first[category.id]},
                )
            first[category.id] = i
            key = name_key(category.name)
            if key in names:
                raise PydanticCustomError(
                    "duplicate_name",
                    "duplicate name '{name}' (the same as categories[{first}] once case and "
                    "Unicode forms are ignored)", {"name": category.name, "first": names[key]})
            names[key] = i
        return self

    @property
    def content_hash(self) -> str:
        """sha256 of the set's canonical content (every field, categories in set order), so a
        stored verdict says exactly which policy judged it."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True,
                               separators=(",", ":"), ensure_ascii=False)
        return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()

    def category(self, category_id: str) -> Category:
        for category in self.categories:
            if category.id == category_id:
                return category
        raise KeyError(category_id)

    def threshold_of(self, category: Category | str) -> float:
        """The category's own threshold, or the set's default."""
        if isinstance(category, str):
            category = self.category(category)
        return self.defaults.threshold if category.threshold is None else category.threshold

    def fingerprint(self) -> str:
        """sha256 hex of the canonical content; equal sets give equal fingerprints across runs."""
        canonical = json.dumps(
            self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
        return hashlib.sha256(f"guardrail-policy/1\n{canonical}".encode()).hexdigest()


# --- rendering -----------------------------------------------------------------------------


def category_key(category: Category) -> str:
    """SafeWatch's JSON key for a category: `C1(Sexual Content)`, no space before the '('."""
    return f"{category.id}({category.name})"


def render_chunk(category: Category) -> str:
    """One `<box>…</box>` policy chunk, ending in `</box>\\n`; the unit encoded in parallel."""
    lines = ["<box>", f"{category.id}: {category.name}:"]
    if category.core_value:
        lines.append(f"Core Value: {category.core_value}")
    lines += [f"[BLOCKED] {rule}" for rule in category.blocked]
    lines += [f"[ALLOWED] {rule}" for rule in category.allowed]
    for ex in category.examples:
        lines.append(f"[EXAMPLE {'violates' if ex.violates else 'allowed'}] {ex.text}")
    lines.append("</box>")
    return "\n".join(lines) + "\n"


# --- loading -------------------------------------------------------------------------------


def load_policy(path: str | os.PathLike[str]) -> PolicySet:
    """Read and validate one policy file; raises only `PolicyError`."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            data = f.read(MAX_POLICY_BYTES + 1)
    except FileNotFoundError:
        raise PolicyError(f"{source}: file not found") from None
    except IsADirectoryError:
        raise PolicyError(f"{source}: is a directory, not a policy file") from None
    except OSError as err:
        raise PolicyError(f"{source}: cannot read: {err.strerror or err}") from None
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyError(f"{source}: file is larger than {MAX_POLICY_BYTES} bytes")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise PolicyError(f"{source}:{line}: not valid UTF-8 text") from None
    return load_policy_text(text, source)


def load_policies(paths: list[str | os.PathLike[str]]) -> PolicySet:
    """Load several policy files and combine them into one set (categories in file order, each
    keeping its own threshold). Category ids must be unique across the files."""
    sets = [load_policy(p) for p in paths]
    if len(sets) == 1:
        return sets[0]
    seen: dict[str, str] = {}
    categories = []
    for path, pset in zip(paths, sets, strict=True):
        for c in pset.categories:
            for key, what in ((c.id, f"category id {c.id!r}"),
                              ("name:" + name_key(c.name), f"category name {c.name!r}")):
                if key in seen:
                    raise PolicyError(f"{os.fspath(path)}: {what} is also in {seen[key]}")
                seen[key] = os.fspath(path)
            categories.append(c.model_copy(update={"threshold": pset.threshold_of(c)}))
    return PolicySet(name="-".join(s.name for s in sets), version=1, categories=categories,
                     description="combined from " + ", ".join(os.fspath(p) for p in paths))


def load_policy_text(text: str, source: str = "<string>") -> PolicySet:
    """Validate policy YAML text (`source` names it in messages); raises only PolicyError."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_POLICY_BYTES:
        raise PolicyError(f"{source}: policy is larger than {MAX_POLICY_BYTES} bytes")
    root = compose(text, source)
    if not isinstance(root, yaml.MappingNode) or root.tag != MAP_TAG:
        line = 1 if root is None else root.start_mark.line + 1
        raise PolicyError(f"{source}:{line}: top level must be a mapping")
    walker = Walker()
    value = walker.walk(root, ())
    errors = list(walker.errors)
    errors += _duplicate_ids(value, walker.lines)
    try:
        policy = PolicySet.model_validate(value)
    except ValidationError as err:
        for e in err.errors():
            loc = tuple(e["loc"])
            # the walker already explained values it could not build; duplicates come from above
            if e["type"] in ("duplicate_id", "duplicate_name") or any(
                loc[:n] in walker.bad for n in range(len(loc) + 1)
            ):
                continue
            errors.append(_from_pydantic(e, walker.lines))
        policy = None
    if errors:
        raise PolicyError(_report(source, errors))
    assert policy is not None, "validation failed without an error"
    return policy


def _duplicate_ids(value: dict[str, Any], lines: dict[KeyPath, int]) -> list[tuple[int, str]]:
    categories = value.get("categories")
    if not isinstance(categories, list):
        return []
    errors, first, names = [], {}, {}
    for i, category in enumerate(categories):
        cid = category.get("id") if isinstance(category, dict) else None
        name = category.get("name") if isinstance(category, dict) else None
        if isinstance(cid, str):
            path = ("categories", i, "id")
            if cid in first:
                msg = f"{format_path(path)}: duplicate id '{cid}' (first at line {first[cid]})"
                errors.append((lines.get(path, 1), msg))
            else:
                first[cid] = lines.get(path, 1)
        if isinstance(name, str):
            path, key = ("categories", i, "name"), name_key(name)
            if key in names:
                msg = (f"{format_path(path)}: duplicate name {name!r} (the same as line "
                       f"{names[key]} once case and Unicode forms are ignored)")
                errors.append((lines.get(path, 1), msg))
            else:
                names[key] = lines.get(path, 1)
    return errors


_PLAIN_MESSAGES = {
    "missing": "is required",
    "extra_forbidden": "unknown key",
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "list_type": "must be a list",
    "model_type": "must be a mapping",
    "dict_type": "must be a mapping",
}


def _from_pydantic(err: Any, lines: dict[KeyPath, int]) -> tuple[int, str]:
    loc: KeyPath = tuple(err["loc"])
    ctx = err.get("ctx") or {}
    kind = err["type"]
    if kind in _PLAIN_MESSAGES:
        message = _PLAIN_MESSAGES[kind]
    elif kind == "string_pattern_mismatch":
        pattern = str(ctx.get("pattern", "")).strip("^$")
        message = f"must match {pattern} (got {_short(err['input'])})"
    elif kind == "literal_error":
        message = f"must be one of {ctx.get('expected', '')}"
    elif (kind == "too_short" and loc == ("categories",)) or kind == "too_long":
        message = f"must have 1 to {MAX_CATEGORIES} entries (got {ctx.get('actual_length')})"
    elif kind == "too_short":
        message = "must not be empty"
    elif kind == "greater_than_equal":
        message = f"must be >= {ctx.get('ge')}"
    elif kind == "value_error":
        message = str(ctx.get("error", err["msg"]))
    else:
        message = err["msg"][:1].lower() + err["msg"][1:]
    where = format_path(loc)
    while loc and loc not in lines:  # the deepest node that exists in the file
        loc = loc[:-1]
    return lines.get(loc, 1), f"{where}: {message}" if where else message


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _report(source: str, errors: list[tuple[int, str]]) -> list[str]:
    ordered = sorted(set(errors))
    messages = [f"{source}:{line}: {msg}" for line, msg in ordered[:MAX_MESSAGES]]
    if len(ordered) > MAX_MESSAGES:
        messages.append(f"{source}: ... and {len(ordered) - MAX_MESSAGES} more errors")
    return messages
