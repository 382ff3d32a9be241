from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from guardrail.verdict import (
    CategoryVerdict,
    Pruning,
    Verdict,
    VideoSummary,
    guardrail_json,
    parse_answer,
)

CATS = [
    ("C1", "Sexual Content"),
    ("C2", "Harassment & Bullying"),
    ("C3", "Threats, Violence & Harm"),
]


def test_well_formed_answer():
    text = (
        "DESCRIPTION: Two people fight in a parking lot.\n"
        'GUARDRAIL: {\n    "C1(Sexual Content)": false,\n'
        '    "C2(Harassment & Bullying)": false,\n    "C3(Threats, Violence & Harm)": true\n}\n'
        "EXPLANATION: C3 applies: fighting that causes injury."
    )
    got = parse_answer(text, CATS)
    assert got.ok and got.reason is None
    assert got.flags == {"C1": False, "C2": False, "C3": True}
    assert got.description == "Two people fight in a parking lot."
    assert got.explanation == "C3 applies: fighting that causes injury."


def test_sloppy_answer_case_spacing_quotes():
    text = (
        "description : a cat video\n guardrail:{ 'c1 (sexual content)' : FALSE , "
        '"C2(Harassment & Bullying)":True,"C3": false}\nExplanation:   bullying of an animal  '
    )
    got = parse_answer(text, CATS)
    assert got.ok
    assert got.flags == {"C1": False, "C2": True, "C3": False}
    assert got.description == "a cat video"
    assert got.explanation == "bullying of an animal"


def test_first_match_wins_and_missing_key_is_not_flagged():
    text = 'GUARDRAIL: {"C1(Sexual Content)": true, "C1(Sexual Content)": false}'
    got = parse_answer(text, CATS)
    assert got.ok
    assert got.flags == {"C1": True, "C2": False, "C3": False}


def test_guardrail_json_roundtrip():
    keys = [f"{cid}({name})" for cid, name in CATS]
    verdict = guardrail_json(keys, [True, False, True])
    text = "DESCRIPTION: x\nGUARDRAIL: " + verdict + "\nEXPLANATION: y"
    assert '"C1(Sexual Content)": true' in text
    assert parse_answer(text, CATS).flags == {"C1": True, "C2": False, "C3": True}


def test_label_only_variant():
    assert parse_answer("safe", CATS).flags == {"C1": False, "C2": False, "C3": False}
    got = parse_answer("unsafe: C2, C3", CATS)
    assert got.ok and got.flags == {"C1": False, "C2": True, "C3": True}


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty answer"),
        ("   \n ", "empty answer"),
        ("DESCRIPTION: a video\nGUARDRAIL: {\nEXPLANATION:", "no category verdict"),
        ("I cannot help with that.", "no category verdict"),
        ("unsafe", "names no category"),
    ],
)
def test_broken_answers_fail_closed(text, reason):
    got = parse_answer(text, CATS)
    assert not got.ok
    assert reason in got.reason
    assert all(got.flags.values()) and set(got.flags) == {"C1", "C2", "C3"}


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_parser_never_raises(text):
    got = parse_answer(text, CATS)
    assert set(got.flags) == {"C1", "C2", "C3"}
    assert got.ok or all(got.flags.values())


def _verdict(**over):
    base = dict(
        flagged=True,
        categories=[CategoryVerdict(id="C1", name="Sexual Content", flagged=True, score=0.9,
                                    threshold=0.5)],
        model="m", policy_set="safewatch", layout="parallel", mode="fast",
        video=VideoSummary(duration_s=1.0, frames_used=8),
        pruning=Pruning(keep_ratio=1.0, kept_tokens=10, total_tokens=10),
    )
    base.update(over)
    return Verdict(**base)


def test_verdict_json_has_spec_keys():
    data = _verdict().model_dump(mode="json")
    assert set(data) == {
        "flagged", "categories", "description", "explanation", "segments", "model",
        "policy_set", "layout", "mode", "video", "pruning", "timing_ms", "policy_version",
        "policy_hash", "calibrated", "warnings",
    }
    assert set(data["timing_ms"]) == {"decode_video", "prefill", "verdict", "generate", "total"}
    assert data["description"] is None and data["explanation"] is None


def test_verdict_rejects_bad_values():
    with pytest.raises(ValidationError):
        _verdict(mode="slow")
    with pytest.raises(ValidationError):
        CategoryVerdict(id="C1", name="x", flagged=False, score=1.5, threshold=0.5)
