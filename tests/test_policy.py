from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from guardrail.errors import PolicyError
from guardrail.policy import (
    MAX_POLICY_BYTES,
    Category,
    PolicySet,
    category_key,
    load_policy,
    load_policy_text,
    render_chunk,
)

POLICY_DIR = Path(__file__).resolve().parents[1] / "policies"
SHIPPED = sorted(POLICY_DIR.glob("*.yaml"))

VALID = """\
name: demo
version: 1
defaults:
  threshold: 0.5
categories:
  - id: C1
    name: First
    blocked: [a]
  - id: C2
    name: Second
    core_value: Be nice.
    blocked:
      - b
    allowed:
      - c
    threshold: 0.7
    severity: high
"""


def errors(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load_policy_text(textwrap.dedent(text), "x.yaml")
    return info.value.messages


def category_yaml(i: int, cid: str | None = None) -> str:
    return f"  - id: {cid or f'C{i}'}\n    name: Cat {i}\n    blocked: [rule {i}]\n"


# --- shipped sets --------------------------------------------------------------------------


def test_ships_at_least_five_sets() -> None:
    names = {p.stem for p in SHIPPED}
    assert {"safewatch", "child_safety", "weapons", "brand_safety", "animals_only"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_set_loads(path: Path) -> None:
    policy = load_policy(path)
    assert policy.name == path.stem
    assert all(c.blocked and c.core_value for c in policy.categories)


def test_safewatch_set_matches_paper_taxonomy() -> None:
    policy = load_policy(POLICY_DIR / "safewatch.yaml")
    assert [category_key(c) for c in policy.categories] == [
        "C1(Sexual Content)",
        "C2(Harassment & Bullying)",
        "C3(Threats, Violence & Harm)",
        "C4(False & Deceptive Information)",
        "C5(Illegal/Regulated Activities)",
        "C6(Hateful Content & Extremism)",
    ]
    assert (policy.name, policy.version) == ("safewatch", 1)
    assert all(c.allowed for c in policy.categories)


# --- valid input ---------------------------------------------------------------------------


def test_valid_policy_fields() -> None:
    policy = load_policy_text(VALID)
    first, second = policy.categories
    assert first.allowed == [] and first.threshold is None and first.severity is None
    assert second.core_value == "Be nice." and second.severity == "high"
    assert policy.threshold_of(first) == 0.5
    assert policy.threshold_of(second) == 0.7
    assert policy.threshold_of("C2") == 0.7
    with pytest.raises(KeyError):
        policy.threshold_of("C9")


def test_defaults_are_optional() -> None:
    text = VALID.replace("defaults:\n  threshold: 0.5\n", "")
    assert load_policy_text(text).defaults.threshold == 0.5


def test_rule_whitespace_is_canonical() -> None:
    text = VALID.replace("blocked: [a]", "blocked:\n      - >\n        folded\n        rule\n")
    assert load_policy_text(text).categories[0].blocked == ["folded rule"]


def test_models_are_frozen() -> None:
    policy = load_policy_text(VALID)
    with pytest.raises(ValidationError):
        policy.categories[0].name = "other"  # type: ignore[misc]


def test_duplicate_ids_rejected_when_built_in_code() -> None:
    cat = Category(id="C1", name="A", blocked=["x"])
    with pytest.raises(ValidationError, match="duplicate id 'C1'"):
        PolicySet(name="p", version=1, categories=[cat, cat])


def test_render_chunk_format() -> None:
    cat = Category(
        id="C9",
        name="Demo",
        core_value="Intent.",
        blocked=["b1", "b2"],
        allowed=["a1"],
        examples=[{"text": "bad", "violates": True}, {"text": "fine", "violates": False}],
    )
    assert render_chunk(cat) == (
        "<box>\nC9: Demo:\nCore Value: Intent.\n[BLOCKED] b1\n[BLOCKED] b2\n[ALLOWED] a1\n"
        "[EXAMPLE violates] bad\n[EXAMPLE allowed] fine\n</box>\n"
    )
    bare = Category(id="X", name="Bare", blocked=["b"])
    assert render_chunk(bare) == "<box>\nX: Bare:\n[BLOCKED] b\n</box>\n"
    assert category_key(bare) == "X(Bare)"


# --- fingerprint ---------------------------------------------------------------------------


def test_fingerprint_stable_and_format_independent() -> None:
    a = load_policy_text(VALID)
    reformatted = VALID.replace("blocked: [a]", "blocked:\n      - a  # same rule") + "# comment\n"
    b = load_policy_text(reformatted)
    assert a.fingerprint() == b.fingerprint() == load_policy_text(VALID).fingerprint()
    assert len(a.fingerprint()) == 64


def test_fingerprint_sensitive_to_order_and_content() -> None:
    a = load_policy_text(VALID)
    swapped = a.model_copy(update={"categories": list(reversed(a.categories))})
    assert swapped.fingerprint() != a.fingerprint()
    changed = load_policy_text(VALID.replace("blocked: [a]", "blocked: [a2]"))
    assert changed.fingerprint() != a.fingerprint()
    renamed = load_policy_text(VALID.replace("version: 1", "version: 2"))
    assert renamed.fingerprint() != a.fingerprint()


# --- errors: exact file:line: path: message ------------------------------------------------


# (replace this, with this, expected message without the "x.yaml:" prefix)
ERROR_CASES = [
    ("    severity: high\n", "    severity: high\n    colour: red\n",
     "18: categories[1].colour: unknown key"),
    ("blocked: [a]", "blocked: []", "8: categories[0].blocked: must not be empty"),
    ("blocked: [a]", 'blocked: ["  "]', "8: categories[0].blocked[0]: must not be empty"),
    ("threshold: 0.7", "threshold: 0", "16: categories[1].threshold: must be in (0, 1)"),
    ("threshold: 0.7", "threshold: 1", "16: categories[1].threshold: must be in (0, 1)"),
    ("threshold: 0.7", "threshold: 1.5", "16: categories[1].threshold: must be in (0, 1)"),
    ("threshold: 0.7", "threshold: .nan", "16: categories[1].threshold: must be in (0, 1)"),
    ("threshold: 0.7", 'threshold: "0.7"', "16: categories[1].threshold: must be a number"),
    ("threshold: 0.5", "threshold: -1", "4: defaults.threshold: must be in (0, 1)"),
    ("version: 1", "version: 1.5", "2: version: must be an integer"),
    ("version: 1", 'version: "1"', "2: version: must be an integer"),
    ("version: 1", "version: true", "2: version: must be an integer"),
    ("version: 1", "version: 0", "2: version: must be >= 1"),
    ("name: demo\n", "", "1: name: is required"),
    ("name: demo", "name: Demo Set", "1: name: must match [a-z0-9][a-z0-9_-]* (got 'Demo Set')"),
    ("    name: First\n", "", "6: categories[0].name: is required"),
    ("name: Second", "name: [1, 2]", "10: categories[1].name: must be a string"),
    ("name: Second", 'name: Say "hi"',
     "10: categories[1].name: must not contain '\"' or '\\' (it is written inside a JSON key)"),
    ("id: C2", "id: C 2", "9: categories[1].id: must match [A-Za-z0-9_-]{1,32} (got 'C 2')"),
    ("id: C2", "id: " + "x" * 33,
     "9: categories[1].id: must match [A-Za-z0-9_-]{1,32} (got '" + "x" * 33 + "')"),
    ("id: C2", "id: 2", "9: categories[1].id: must be a string"),
    ("id: C2", "id: C1", "9: categories[1].id: duplicate id 'C1' (first at line 6)"),
    ("severity: high", "severity: extreme",
     "17: categories[1].severity: must be one of 'low', 'medium' or 'high'"),
    ("    allowed:\n      - c\n", "    allowed: c\n", "14: categories[1].allowed: must be a list"),
    ("defaults:\n  threshold: 0.5", "defaults: 0.5", "3: defaults: must be a mapping"),
    ("  - id: C1", "  - 7\n  - id: C1", "6: categories[0]: must be a mapping"),
    ("    name: First\n", "    name: First\n    name: Again\n",
     "8: categories[0].name: duplicate key 'name' (first at line 7)"),
    ("version: 1\n", "version: 1\nversion: 2\n",
     "3: version: duplicate key 'version' (first at line 2)"),
    ("blocked: [a]", "blocked: [a",
     "9: yaml: while parsing a flow sequence, expected ',' or ']', but got ':'"),
    ("name: demo", "name: 'demo",
     "18: yaml: while scanning a quoted scalar, found unexpected end of stream"),
    ("    name: First\n", "    name: First\n   bad: indent\n",
     ("8: yaml: while parsing a block collection, expected <block end>, "
      "but found '<block mapping start>'")),
]  # fmt: skip


@pytest.mark.parametrize(("old", "new", "expected"), ERROR_CASES)
def test_error_message(old: str, new: str, expected: str) -> None:
    assert old in VALID
    assert errors(VALID.replace(old, new, 1)) == [f"x.yaml:{expected}"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "x.yaml:1: top level must be a mapping"),
        ("# only a comment\n", "x.yaml:1: top level must be a mapping"),
        ("- a\n- b\n", "x.yaml:1: top level must be a mapping"),
        ("\n\njust text\n", "x.yaml:3: top level must be a mapping"),
        ("42", "x.yaml:1: top level must be a mapping"),
    ],
)
def test_top_level_must_be_mapping(text: str, expected: str) -> None:
    assert errors(text) == [expected]


def test_all_errors_collected_sorted_by_line() -> None:
    text = """\
        name: Bad
        version: 1.5
        categories:
          - id: C1
            name: A
            blocked: []
            threshold: 2
            extra: 1
          - id: C1
            blocked: [x]
        """
    assert errors(text) == [
        "x.yaml:1: name: must match [a-z0-9][a-z0-9_-]* (got 'Bad')",
        "x.yaml:2: version: must be an integer",
        "x.yaml:6: categories[0].blocked: must not be empty",
        "x.yaml:7: categories[0].threshold: must be in (0, 1)",
        "x.yaml:8: categories[0].extra: unknown key",
        "x.yaml:9: categories[1].id: duplicate id 'C1' (first at line 4)",
        "x.yaml:9: categories[1].name: is required",
    ]


def test_missing_categories_and_empty_list() -> None:
    assert errors("name: a\nversion: 1\n") == ["x.yaml:1: categories: is required"]
    assert errors("name: a\nversion: 1\ncategories: []\n") == [
        "x.yaml:3: categories: must have 1 to 64 entries (got 0)"
    ]


def test_at_most_64_categories() -> None:
    head = "name: big\nversion: 1\ncategories:\n"
    ok = head + "".join(category_yaml(i) for i in range(64))
    assert len(load_policy_text(ok).categories) == 64
    too_many = head + "".join(category_yaml(i) for i in range(65))
    assert errors(too_many) == ["x.yaml:3: categories: must have 1 to 64 entries (got 65)"]


def test_python_tags_are_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for text in [
        f'!!python/object/apply:os.system ["touch {marker}"]',
        f'name: !!python/object/apply:os.system ["touch {marker}"]\nversion: 1\n',
        f"name: !!python/object/apply:os.system\n  args: ['touch {marker}']\nversion: 1\n",
        "name: !!python/name:os.system ''\nversion: 1\n",
        "name: !custom x\nversion: 1\n",
    ]:
        messages = errors(text)
        assert any(
            m.endswith(("is not allowed", "top level must be a mapping")) for m in messages
        ), messages
    assert not marker.exists()
    assert errors('name: !!python/object/apply:os.system ["echo hi"]\nversion: 1\n') == [
        "x.yaml:1: categories: is required",
        "x.yaml:1: name: tag !!python/object/apply:os.system is not allowed",
    ]


def test_yaml_11_booleans_as_keys_stay_strings() -> None:
    assert errors(VALID.replace("    severity: high\n", "    on: yes\n")) == [
        "x.yaml:17: categories[1].on: unknown key"
    ]


def test_alias_bomb_and_recursion_are_bounded() -> None:
    bomb = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        bomb.append(f"{chr(97 + i)}: &{chr(97 + i)} [{', '.join([f'*{chr(96 + i)}'] * 10)}]")
    start = time.monotonic()
    messages = errors("\n".join(bomb) + "\n")
    assert time.monotonic() - start < 10
    assert any("more than" in m for m in messages)
    assert any("recursive alias" in m for m in errors("a: &a [*a]\n"))


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    assert errors("a: " + "[" * 5000 + "]" * 5000 + "\n")
    assert errors("a: " + "[" * 100 + "]" * 100 + "\n")


def test_multiple_documents_rejected() -> None:
    assert errors("a: 1\n---\nb: 2\n") == [
        "x.yaml:2: yaml: expected a single document in the stream, but found another document"
    ]


def test_control_characters_rejected() -> None:
    assert errors("name: a\x00\n") == ["x.yaml:1: yaml: special characters are not allowed"]


# --- files ---------------------------------------------------------------------------------


def test_missing_file() -> None:
    with pytest.raises(PolicyError) as info:
        load_policy("does/not/exist.yaml")
    assert info.value.messages == ["does/not/exist.yaml: file not found"]


def test_directory_is_not_a_policy(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="is a directory"):
        load_policy(tmp_path)


def test_file_errors_name_the_path(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(VALID.replace("threshold: 0.7", "threshold: 1.5"))
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.messages == [f"{path}:16: categories[1].threshold: must be in (0, 1)"]
    assert info.value.exit_code == 2


def test_too_large_file_rejected_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text(VALID + "#" * MAX_POLICY_BYTES + "\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.messages == [f"{path}: file is larger than {MAX_POLICY_BYTES} bytes"]
    with pytest.raises(PolicyError, match="larger than"):
        load_policy_text("[" * (MAX_POLICY_BYTES + 1))


def test_bom_and_bad_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + VALID.encode())
    assert load_policy(path).name == "demo"
    path.write_bytes(b"name: demo\nversion: \xff\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.messages == [f"{path}:2: not valid UTF-8 text"]


# --- property: nothing but PolicyError escapes ----------------------------------------------

KEYS = ["name", "version", "description", "defaults", "threshold", "categories", "id",
        "blocked", "allowed", "severity", "examples", "text", "violates", "core_value"]  # fmt: skip
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
keys = st.sampled_from(KEYS) | st.text(max_size=10)
structures = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=5),
    max_leaves=30,
)


def _only_policy_errors(text: str) -> None:
    try:
        load_policy_text(text, "fuzz.yaml")
    except PolicyError as err:
        assert err.messages and all(m.startswith("fuzz.yaml") for m in err.messages)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_arbitrary_text_only_raises_policy_error(text: str) -> None:
    _only_policy_errors(text)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(structures, st.booleans(), st.integers(min_value=0, max_value=400))
def test_arbitrary_yaml_only_raises_policy_error(value: object, flow: bool, cut: int) -> None:
    text = yaml.safe_dump(value, default_flow_style=flow, allow_unicode=True)
    _only_policy_errors(text)
    _only_policy_errors(text[:cut])  # truncated documents too


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.dictionaries(keys, structures, max_size=6), max_size=4), structures)
def test_policy_shaped_yaml_only_raises_policy_error(categories: list, defaults: object) -> None:
    doc = {"name": "fuzz", "version": 1, "defaults": defaults, "categories": categories}
    _only_policy_errors(yaml.safe_dump(doc, allow_unicode=True))


@pytest.mark.parametrize("second,message", [
    ("Weapons", "duplicate name 'Weapons' (the same as line 4"),
    ("WEAPONS", "duplicate name 'WEAPONS'"),
    ("\ufb01rearms", "duplicate name"),                  # the fi ligature: NFKC "firearms"
    ("Weap\u200bons", "invisible or direction characters (U+200B)"),
    ("\u202eWeapons", "invisible or direction characters (U+202E)"),
    ("Weapons ", "duplicate name"),                   # stored without the trailing space
    ("Weapons\u00a0", "duplicate name"),              # a no-break space: NFKC a space
])
def test_category_names_must_differ_as_people_read_them(second, message):
    first = "firearms" if second.startswith("\ufb01") else "Weapons"
    text = ("name: t\nversion: 1\ncategories:\n"
            f"  - {{id: A1, name: \"{first}\", blocked: [guns]}}\n"
            f"  - {{id: A2, name: \"{second}\", blocked: [knives]}}\n")
    with pytest.raises(PolicyError) as err:
        load_policy_text(text, "t.yaml")
    assert str(err.value).startswith("t.yaml:5: categories[1].name: ") and message in str(
        err.value)


def test_versions_fit_a_32_bit_integer():
    text = "name: t\nversion: {}\ncategories:\n  - {{id: A1, name: A, blocked: [x]}}\n"
    assert load_policy_text(text.format(2**31 - 1)).version == 2**31 - 1
    with pytest.raises(PolicyError, match="version: input should be less than or equal"):
        load_policy_text(text.format(2**31))
