"""The verdict a moderator gets back, and a fail-closed parser of SafeWatch's answers.

`Verdict` is the one output type of the engine: the CLI prints it, the HTTP service returns it,
the bench writes it. `parse_answer` reads the free-text format SafeWatch-style models generate:

    DESCRIPTION: <text>
    GUARDRAIL: {"C1(Sexual Content)": false, ...}
    EXPLANATION: <text>
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Mode = Literal["fast", "explain", "explain_flagged"]


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CategoryVerdict(_Schema):
    id: str = Field(description="Category id from the policy set, e.g. 'C1'.")
    name: str = Field(description="Category name from the policy set.")
    flagged: bool = Field(description="score >= threshold.")
    score: float = Field(ge=0.0, le=1.0, description="P(violated), calibrated where available.")
    threshold: float = Field(gt=0.0, lt=1.0, description="Flagging threshold for this category.")


class Segment(_Schema):
    start_s: float = Field(ge=0.0, description="Window start in seconds.")
    end_s: float = Field(ge=0.0, description="Window end in seconds.")
    flagged_ids: list[str] = Field(description="Categories flagged in this window.")
    scores: dict[str, float] = Field(description="Score per category id in this window.")


class VideoSummary(_Schema):
    duration_s: float = Field(ge=0.0, description="Playback length in seconds, from the frames' "
                              "presentation timestamps (1.0 for a still image).")
    frames_used: int = Field(ge=0, description="Frames the model saw, over all windows.")
    sampling: str = Field("uniform", description="How the frames were chosen: uniform, fps, "
                          "coverage (every shot found by a pass over the whole video), or image.")
    shots: int | None = Field(None, description="coverage: shots the pass over the whole video "
                              "found; null otherwise.")


class Pruning(_Schema):
    keep_ratio: float = Field(gt=0.0, le=1.0, description="Share of video tokens kept "
                              "(1.0: pruning off).")
    kept_tokens: int = Field(ge=0, description="Video tokens the model attended to, over all "
                             "windows.")
    total_tokens: int = Field(ge=0, description="Video tokens before pruning.")


class Timing(_Schema):
    decode_video: float = Field(0.0, description="Decoding and preparing the frames.")
    prefill: float = Field(0.0, description="Visual encoder and prompt prefill (the category "
                           "probes too where they share its forward pass: parallel layout, no "
                           "pruning).")
    verdict: float = Field(0.0, description="Reading every category's score (and its forward "
                           "pass where that is separate).")
    generate: float = Field(0.0, description="Generating the description and explanation "
                            "(0 in fast mode).")
    total: float = Field(0.0, description="Wall time for this video (a batch's time is shared "
                         "among its videos).")


class Verdict(_Schema):
    flagged: bool = Field(description="True when any category is flagged.")
    categories: list[CategoryVerdict] = Field(description="Every category, in the set's order.")
    description: str | None = Field(default=None, description="What the video shows, in the "
                                    "model's words; null in fast mode.")
    explanation: str | None = Field(default=None, description="Why the flagged categories were "
                                    "flagged; null in fast mode.")
    segments: list[Segment] = Field(default_factory=list, description="One per window, in "
                                    "time order; a category's score is its maximum over them.")
    model: str = Field(description="The model that judged (its directory or hub id).")
    policy_set: str = Field(description="Name of the policy set.")
    layout: str = Field(description="Prompt layout: sequential, parallel, parallel_cached or "
                        "isolated.")
    mode: Mode = Field(description="fast, explain or explain_flagged.")
    video: VideoSummary = Field(description="What was judged.")
    pruning: Pruning = Field(description="Policy-aware pruning of video tokens.")
    timing_ms: Timing = Field(default_factory=Timing, description="Milliseconds per stage.")
    policy_version: int | None = Field(default=None, description="Version of the policy set.")
    policy_hash: str | None = Field(default=None, description="sha256 of the policy set's "
                                    "canonical content: exactly which policy judged.")
    calibrated: bool = Field(default=False, description="Per-category score calibration was "
                             "applied.")
    warnings: list[str] = Field(default_factory=list, description="Why these scores may not "
                                "mean what they say (e.g. a random test model).")

    def flagged_ids(self) -> list[str]:
        return [c.id for c in self.categories if c.flagged]

    def scores(self) -> dict[str, float]:
        return {c.id: c.score for c in self.categories}


# ---------------------------------------------------------------------------------------------
# Building a verdict from per-window scores.

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class WindowResult:
    """What the engine found in one window."""

    scores: torch.Tensor        # [m] fp32, one per category in set order
    total_tokens: int           # video tokens in the window
    kept_tokens: int            # after pruning
    prefill_ms: float
    verdict_ms: float
    prep_ms: float


def build_verdict(policies: Any, thresholds: list[float], video: Any,
                  results: list[WindowResult], scores: torch.Tensor, flags: list[bool],
                  text: Any, *, model: str, layout: str, mode: str, keep_ratio: float,
                  decode_ms: float, generate_ms: float, total_ms: float, calibrated: bool = False,
                  warnings: tuple[str, ...] = ()) -> Verdict:
    """The verdict of one video from its windows (in time order)."""
    cats = policies.categories
    categories = [
        CategoryVerdict(id=c.id, name=c.name, flagged=f, score=s, threshold=t)
        for c, s, f, t in zip(cats, scores.tolist(), flags, thresholds, strict=True)
    ]
    segments = []
    for clip, res in zip(video.clips, results, strict=True):
        win = dict(zip([c.id for c in cats], res.scores.tolist(), strict=True))
        segments.append(Segment(
            start_s=clip.window.start_s, end_s=clip.window.end_s, scores=win,
            flagged_ids=[c.id for c, t in zip(cats, thresholds, strict=True) if win[c.id] >= t]))
    return Verdict(
        flagged=any(flags), categories=categories,
        description=text.description if text else None,
        explanation=text.explanation if text else None,
        segments=segments, model=model, policy_set=policies.name, layout=layout, mode=mode,
        video=VideoSummary(duration_s=video.info.duration_s,
                           frames_used=sum(len(c.window.indices) for c in video.clips),
                           sampling=video.sampling, shots=video.shots),
        pruning=Pruning(keep_ratio=keep_ratio, kept_tokens=sum(r.kept_tokens for r in results),
                        total_tokens=sum(r.total_tokens for r in results)),
        timing_ms=Timing(
            decode_video=decode_ms + sum(r.prep_ms for r in results),
            prefill=sum(r.prefill_ms for r in results),
            verdict=sum(r.verdict_ms for r in results),
            generate=generate_ms, total=total_ms),
        policy_version=policies.version, policy_hash=policies.content_hash,
        calibrated=calibrated, warnings=[*warnings, *video.warnings],
    )


# ---------------------------------------------------------------------------------------------
# Parsing SafeWatch's free-text answer.

@dataclass(frozen=True)
class ParsedAnswer:
    """What a free-text answer says. `ok` is False when it could not be read; then every
    category is reported flagged (fail closed) and `reason` says why."""

    ok: bool
    flags: dict[str, bool]          # category id -> flagged
    description: str | None
    explanation: str | None
    reason: str | None = None


_BOOL = r"(true|false|yes|no|1|0)"
_SECTION = re.compile(r"^\s*(description|guardrail|explanation)\s*[:：]\s*", re.I | re.M)


def _sections(text: str) -> dict[str, str]:
    """Split on DESCRIPTION:/GUARDRAIL:/EXPLANATION: headers; first occurrence of each wins."""
    marks = [(m.group(1).lower(), m.start(), m.end()) for m in _SECTION.finditer(text)]
    out: dict[str, str] = {}
    for i, (name, _, end) in enumerate(marks):
        stop = marks[i + 1][1] if i + 1 < len(marks) else len(text)
        out.setdefault(name, text[end:stop].strip())
    return out


def _flag_for(text: str, cid: str, name: str) -> bool | None:
    """SafeWatch's rule: the first `"Cid(Name)": bool` match (any case, any spacing), then a bare
    `"Cid": bool` key; None when neither appears."""
    full = re.escape(cid) + r"\s*\(\s*" + re.escape(name) + r"\s*\)"
    for key in (full, re.escape(cid) + r"(?:\s*\([^\"]*\))?"):
        m = re.search(r"[\"']?\s*" + key + r"\s*[\"']?\s*[:=]\s*[\"']?" + _BOOL + r"\b", text, re.I)
        if m:
            return m.group(1).lower() in ("true", "yes", "1")
    return None


def parse_answer(text: str, categories: list[tuple[str, str]]) -> ParsedAnswer:
    """Read a SafeWatch-style answer for `categories` ([(id, name), ...]).

    Tolerant of case, spacing, quotes, missing sections and extra text. Fails closed: when no
    category key can be read at all, or the text is empty, every category is flagged and `ok` is
    False. A key missing while others are present counts as not flagged (SafeWatch's rule).
    """
    if not text or not text.strip():
        return _fail(categories, "empty answer")
    parts = _sections(text)
    verdict_text = parts.get("guardrail", text)
    found = {cid: _flag_for(verdict_text, cid, name) for cid, name in categories}
    if all(v is None for v in found.values()):
        found = {cid: _flag_for(text, cid, name) for cid, name in categories}
    if all(v is None for v in found.values()):
        lowered = text.strip().lower()
        if re.match(r"^(safe|unsafe)\b", lowered):
            return _label_only(lowered, categories, parts)
        return _fail(categories, "no category verdict found in the answer")
    flags = {cid: bool(v) for cid, v in found.items()}
    return ParsedAnswer(True, flags, parts.get("description"), parts.get("explanation"))


def _label_only(lowered: str, categories: list[tuple[str, str]], parts: dict[str, str]):
    """SafeWatch's label-only variant: `safe`, or `unsafe` + a comma-separated category list."""
    if lowered.startswith("safe"):
        return ParsedAnswer(True, {cid: False for cid, _ in categories}, None, None)
    rest = lowered[len("unsafe"):]
    flags = {
        cid: bool(re.search(r"\b" + re.escape(cid.lower()) + r"\b", rest) or name.lower() in rest)
        for cid, name in categories
    }
    if not any(flags.values()):
        return _fail(categories, "answer says unsafe but names no category")
    return ParsedAnswer(True, flags, None, None)


def _fail(categories: list[tuple[str, str]], reason: str) -> ParsedAnswer:
    return ParsedAnswer(False, {cid: True for cid, _ in categories}, None, None, reason)


def guardrail_json(keys: list[str], flags: list[bool]) -> str:
    """The GUARDRAIL object exactly as SafeWatch writes it (4-space indent, one key per line)."""
    return json.dumps(dict(zip(keys, flags, strict=True)), indent=4, ensure_ascii=False)
