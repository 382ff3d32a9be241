from __future__ import annotations

import re
from pathlib import Path

import pytest

from guardrail.errors import UsageError
from guardrail.policy import PolicySet, category_key, load_policy, render_chunk
from guardrail.prompt import (
    CHUNKS_CLOSE,
    CHUNKS_OPEN,
    LAYOUTS,
    VIDEO_SLOT,
    build_prompt,
    explain_tail,
    prompt_segments,
    render_prompt,
)

POLICY_DIR = Path(__file__).resolve().parents[1] / "policies"


@pytest.fixture(scope="module")
def policies() -> PolicySet:
    return load_policy(POLICY_DIR / "safewatch.yaml")


def test_one_chunk_per_category_in_order(policies: PolicySet) -> None:
    prompt = build_prompt(policies)
    assert len(prompt.chunks) == len(policies.categories) == 6
    for chunk, category in zip(prompt.chunks, policies.categories, strict=True):
        assert chunk == render_chunk(category)
        assert chunk.startswith(f"<box>\n{category.id}: {category.name}:\n")
        assert chunk.endswith("</box>\n")
        assert chunk.count("<box>") == 1 and chunk.count("</box>") == 1
        assert f"Core Value: {category.core_value}\n" in chunk
        assert all(f"[BLOCKED] {rule}\n" in chunk for rule in category.blocked)
        assert all(f"[ALLOWED] {rule}\n" in chunk for rule in category.allowed)


def test_chunk_text_does_not_depend_on_position(policies: PolicySet) -> None:
    reordered = policies.model_copy(update={"categories": policies.categories[::-1]})
    a, b = build_prompt(policies), build_prompt(reordered)
    assert a.chunks == b.chunks[::-1]
    assert a.probes == b.probes[::-1]
    assert a.keys == b.keys[::-1]
    # the text every chunk and probe shares lists categories canonically, not in file order
    assert a.system == b.system and a.question == b.question


def test_keys_and_probes(policies: PolicySet) -> None:
    prompt = build_prompt(policies)
    assert prompt.keys == tuple(category_key(c) for c in policies.categories)
    assert prompt.keys[0] == "C1(Sexual Content)"
    assert prompt.probes[0] == 'GUARDRAIL: {"C1(Sexual Content)":'
    for key, probe in zip(prompt.keys, prompt.probes, strict=True):
        assert " (" not in key
        assert probe.endswith(f'"{key}":')
        assert not probe.endswith((" ", "\n"))


def test_system_and_question_content(policies: PolicySet) -> None:
    prompt = build_prompt(policies)
    names = re.search(
        r"<BEGIN HARMFUL CATEGORIES>\n(.*)\n<END HARMFUL CATEGORIES>\n", prompt.system, re.DOTALL
    )
    assert names and names.group(1).splitlines() == [
        f"{c.id}: {c.name}" for c in policies.categories
    ]
    assert prompt.system.startswith("You are a video guardrail model")
    assert prompt.system.endswith("<END HARMFUL CATEGORIES>\n")
    assert "DESCRIPTION:" in prompt.system
    assert prompt.question.startswith("Judge the video")
    for marker in ("DESCRIPTION:", "GUARDRAIL:", "EXPLANATION:"):
        assert marker in prompt.question
    assert all(f'"{key}"' in prompt.question for key in prompt.keys)
    # Q follows the video in one layout and the policies in another: no "above"/"below" video.
    assert not re.search(r"video (above|below)", prompt.question)


def test_every_segment_ends_with_newline(policies: PolicySet) -> None:
    prompt = build_prompt(policies)
    assert all(s.endswith("\n") for s in (prompt.system, *prompt.chunks, prompt.question))


@pytest.mark.parametrize("layout", [x for x in LAYOUTS if x != "isolated"])
def test_render_orders_segments_per_layout(policies: PolicySet, layout: str) -> None:
    prompt = build_prompt(policies)
    text = render_prompt(prompt, layout, video="<VIDEO>")
    chunks = "".join(prompt.chunks)
    wrapped = CHUNKS_OPEN + chunks + CHUNKS_CLOSE
    if layout == "parallel_cached":
        assert text == prompt.system + wrapped + "<VIDEO>\n" + prompt.question
    else:
        assert text == prompt.system + "<VIDEO>\n" + wrapped + prompt.question
    kinds = [s.kind for s in prompt_segments(prompt, layout)]
    assert kinds.count("chunk") == len(prompt.chunks)
    assert kinds[0] == "system" and kinds[-1] == "question"
    video_at = kinds.index("video")
    assert video_at == (1 + len(prompt.chunks) if layout == "parallel_cached" else 1)


@pytest.mark.parametrize("style", ["default", "safewatch"])
def test_isolated_branches_name_one_category_each(policies: PolicySet, style: str) -> None:
    """S V shared, then per category its chunk and a question naming only its key; the shared
    prefix plus the explain tail is exactly the sequential prompt."""
    prompt = build_prompt(policies, style=style)
    segments = prompt_segments(prompt, "isolated")
    assert [s.kind for s in segments] == ["system", "video"] + ["branch"] * len(prompt.chunks)
    for seg, chunk, key in zip(segments[2:], prompt.chunks, prompt.keys, strict=True):
        assert chunk in seg.text and f'"{key}"' in seg.text
        others = [k for k in prompt.keys if k != key]
        assert not any(f'"{k}"' in seg.text for k in others)
    head = "".join(s.text for s in segments[:2]).replace(VIDEO_SLOT, "<VIDEO>")
    assert head + explain_tail(prompt) == render_prompt(prompt, "sequential", video="<VIDEO>")


def test_unknown_layout_is_a_usage_error(policies: PolicySet) -> None:
    with pytest.raises(UsageError, match="unknown layout 'diagonal'"):
        render_prompt(build_prompt(policies), "diagonal")


def test_build_prompt_is_deterministic(policies: PolicySet) -> None:
    again = load_policy(POLICY_DIR / "safewatch.yaml")
    assert build_prompt(policies) == build_prompt(again)
    assert render_prompt(build_prompt(policies), "parallel") == render_prompt(
        build_prompt(again), "parallel"
    )


@pytest.mark.parametrize("path", sorted(POLICY_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_set_renders(path: Path) -> None:
    prompt = build_prompt(load_policy(path))
    for layout in LAYOUTS:
        text = render_prompt(prompt, layout)
        assert text.count("<box>") == len(prompt.chunks)
        assert text.count("<video>") == 1
