"""The text of the guardrail prompt, split into the segments the engine lays out.

Segments: `S` (role, tasks, category list), `V` (video, inserted by the engine), `P_1..P_m` (one
policy chunk per category), `Q` (output instructions), then one verdict probe per category.
This module builds plain text only: no chat template and no video tokens; the model
adapter wraps the text in its chat template. The wording paraphrases SafeWatch's prompt
(`reference/safewatch.md`). Every segment ends with a newline, so segments concatenate as they are.

Layout `isolated` judges each category by its own prompt: the shared `S V`, then per category a
branch `P_i Q_i` (one policy and a short question naming it) before its probe. Its explain text
continues `S V` with the sequential tail (every chunk and the full question, `explain_tail`).

Styles: `default` (our wording: S before the video) and `safewatch` (SafeWatch's own prompt text,
as its released evaluation sends it to SafeWatch-8B: the frames first, then the whole
instruction, with the category list and JSON keys generated from the policy set; the verdict
probes follow its trained answer, `GUARDRAIL: {` then one indented key per line).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

from guardrail.errors import UsageError
from guardrail.policy import PolicySet, category_key, render_chunk

LAYOUTS = ("sequential", "parallel", "parallel_cached", "isolated")
STYLES = ("default", "safewatch")

SegmentKind = Literal["system", "video", "chunk", "question", "branch"]

SAFE_EXPLANATION = "No safety violations were detected in the video."


CHUNKS_OPEN = "<BEGIN HARMFUL CATEGORIES EXPLANATIONS>\n"
CHUNKS_CLOSE = "<END HARMFUL CATEGORIES EXPLANATIONS>\n"


@dataclass(frozen=True)
class PromptText:
    """The text of every prompt segment for one policy set; categories in the set's order."""

    system: str  # S: role line, task list, category names
    chunks: tuple[str, ...]  # P_1..P_m: render_chunk(c) per category
    question: str  # Q: the output specification
    probes: tuple[str, ...]  # per category: 'GUARDRAIL: {"C1(Sexual Content)":' (no trailing space)
    keys: tuple[str, ...]  # per category: 'C1(Sexual Content)'
    intro: str = ""  # text between the video and the chunks (the safewatch style's instruction)
    questions: tuple[str, ...] = ()  # per category: `isolated`'s short question naming it


class Segment(NamedTuple):
    kind: SegmentKind
    text: str  # for the video segment: the text around the video, split at VIDEO_SLOT


VIDEO_SLOT = "\x00"  # where the video tokens go inside the video segment's text


def build_prompt(policies: PolicySet, style: str = "default") -> PromptText:
    """The prompt text for a policy set in `style` (one of STYLES); deterministic (equal sets
    give equal text)."""
    if style not in STYLES:
        raise UsageError(f"unknown prompt style {style!r} (choose from {', '.join(STYLES)})")
    if style == "safewatch":
        return _safewatch(policies)
    keys = tuple(category_key(c) for c in policies.categories)
    return PromptText(
        system=_system(policies),
        chunks=tuple(render_chunk(c) for c in policies.categories),
        question=_question(tuple(category_key(c) for c in _canonical(policies))),
        probes=tuple(f'GUARDRAIL: {{"{key}":' for key in keys),
        keys=keys,
        questions=tuple(_one_question(key) for key in keys),
    )


def prompt_segments(prompt: PromptText, layout: str) -> tuple[Segment, ...]:
    """Segments in the order `layout` puts them; probes are not included.

    The explanations header and footer must sit right before and after the chunks, which are
    parallel, so they join the sequential segment next to them: the video segment carries text
    around the video tokens (split at VIDEO_SLOT), and each segment ends with a newline."""
    check_layout(layout)
    if layout == "isolated":
        return (
            Segment("system", prompt.system),
            Segment("video", VIDEO_SLOT + "\n" + prompt.intro),
            *(Segment("branch", CHUNKS_OPEN + chunk + CHUNKS_CLOSE + question)
              for chunk, question in zip(prompt.chunks, prompt.questions, strict=True)),
        )
    chunks = tuple(Segment("chunk", text) for text in prompt.chunks)
    if layout == "parallel_cached":
        return (
            Segment("system", prompt.system + prompt.intro + CHUNKS_OPEN),
            *chunks,
            Segment("video", CHUNKS_CLOSE + VIDEO_SLOT + "\n"),
            Segment("question", prompt.question),
        )
    return (
        Segment("system", prompt.system),
        Segment("video", VIDEO_SLOT + "\n" + prompt.intro + CHUNKS_OPEN),
        *chunks,
        Segment("question", CHUNKS_CLOSE + prompt.question),
    )


def explain_tail(prompt: PromptText) -> str:
    """What follows `S V` in the sequential prompt: every chunk and the full question. Under
    `isolated`, explain mode continues the shared prefix with it before the answer."""
    return CHUNKS_OPEN + "".join(prompt.chunks) + CHUNKS_CLOSE + prompt.question


def render_prompt(prompt: PromptText, layout: str, video: str = "<video>") -> str:
    """The full prompt text as the model sees it, `video` standing for the video tokens. Under
    `isolated`: the shared prefix once, then each category's branch after a `--- branch i`
    marker line (each branch follows the prefix directly; the markers are not model text)."""
    segments = prompt_segments(prompt, layout)
    text = "".join(s.text.replace(VIDEO_SLOT, video) for s in segments if s.kind != "branch")
    for i, seg in enumerate(s for s in segments if s.kind == "branch"):
        text += f"--- branch {i + 1}: {prompt.keys[i]}\n{seg.text}"
    return text


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise UsageError(f"unknown layout {layout!r} (choose from {', '.join(LAYOUTS)})")
    return layout


def _canonical(policies: PolicySet) -> list:
    """Categories sorted by id, for the text that lists them all (S and Q). Those segments are
    shared by every chunk and probe, so listing in YAML order would make the verdict depend on
    the order of the file, which PEPE exists to prevent."""
    return sorted(policies.categories, key=lambda c: c.id)


def _system(policies: PolicySet) -> str:
    names = "\n".join(f"{c.id}: {c.name}" for c in _canonical(policies))
    return (
        "You are a video guardrail model. You watch a video and judge it against a set of safety "
        "policies: harmful categories, each with rules on what is blocked and what is allowed.\n"
        "Your tasks:\n"
        "1. Summarise the content of the video in one to three sentences, starting with "
        '"DESCRIPTION:".\n'
        "2. Analyse the video for each of the harmful categories below, following the blocked "
        "and allowed rules of each category.\n"
        "<BEGIN HARMFUL CATEGORIES>\n"
        f"{names}\n"
        "<END HARMFUL CATEGORIES>\n"
    )


def _question(keys: tuple[str, ...]) -> str:
    listed = "\n".join(f'"{key}"' for key in keys)
    return (
        "Judge the video against every harmful category explained above. Answer in three parts, "
        "in this order:\n"
        '1. "DESCRIPTION:" followed by a short summary of the video.\n'
        '2. "GUARDRAIL:" followed by a JSON object with one boolean per category, with exactly '
        "these keys:\n"
        f"{listed}\n"
        "Set a category to true only if the video violates it, and only for the most relevant "
        "categories. If the video is safe, set every category to false.\n"
        '3. "EXPLANATION:" followed by why each flagged category applies, citing the specific '
        f'rules the video violates. If nothing is flagged, write "{SAFE_EXPLANATION}"\n'
    )


def _one_question(key: str) -> str:
    return (
        "Judge the video against the harmful category explained above, and only that category. "
        'Answer with "GUARDRAIL:" followed by a JSON object with exactly this key:\n'
        f'"{key}"\n'
        "Set it to true only if the video violates this category; otherwise set it to false.\n"
    )


def _safewatch_one_question(key: str) -> str:
    return (
        "\n**Provide the moderation result in the following JSON format:**\n\n"
        f'GUARDRAIL = {{{{\n"{key}": boolean\n}}}}\n\n'
        "**Set the value to true ONLY if the video violates this category. If it does not, set "
        "it to false.**\n"
        '**The answer must be the JSON format of "GUARDRAIL", beginning with "GUARDRAIL:"**\n\n'
    )


def _safewatch(policies: PolicySet) -> PromptText:
    """SafeWatch's evaluation prompt (`video_moderation_prompt_vg_fine_grained_final`) verbatim
    around the generated parts; categories listed canonically as in the default style. NOTE: the
    doubled braces of `GUARDRAIL = {{` are in the text SafeWatch's evaluation sends."""
    keys = tuple(category_key(c) for c in policies.categories)
    canonical = _canonical(policies)
    names = " ".join(f"{c.id}: {c.name};" for c in canonical)
    listed = ",\n".join(f'"{category_key(c)}": boolean' for c in canonical)
    intro = (
        "You are a helpful video guardrail model to detect if a video contains unsafe, harmful "
        "content that needs to be moderated.\n\n"
        "**As a guardrail model, your tasks are:**\n\n"
        '**1. Summarize the content of the video, beginning with "DESCRIPTION:".**\n'
        "**2. Analyze the video for the presence of the following harmful content categories:**"
        "\n\n<BEGIN HARMFUL CATEGORIES>\n"
        f"{names}\n"
        "<END HARMFUL CATEGORIES>\n\n"
        "**Refer to the detailed explanations of each category below:**\n\n"
    )
    question = (
        "\n**Provide the moderation result in the following JSON format:**\n\n"
        f"GUARDRAIL = {{{{\n{listed}\n}}}}\n\n"
        "**Set the value to true ONLY for the most relevant categories found in the video. If no "
        "harmful content is detected, set all values to false.**\n"
        "**The first line must be the summarization the content of the video, beginning with "
        '"DESCRIPTION:"**\n'
        '**The second line must be the JSON format of "GUARDRAIL", beginning with "GUARDRAIL:"**\n'
        "**For each category flagged as true, provide a brief explanation of why it was flagged "
        "and list the specific policy violations within that category in the third line, "
        'beginning with "EXPLANATION:"**\n\n'
    )
    return PromptText(
        system="",
        chunks=tuple(render_chunk(c) for c in policies.categories),
        question=question,
        probes=tuple(f'GUARDRAIL: {{\n    "{key}":' for key in keys),
        keys=keys,
        intro=intro,
        questions=tuple(_safewatch_one_question(key) for key in keys),
    )
