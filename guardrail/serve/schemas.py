"""Request and response bodies of the HTTP API. The verdict is `guardrail.verdict`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from guardrail.policy import MAX_VERSION
from guardrail.verdict import Mode, Verdict

JobStatus = Literal["queued", "running", "succeeded", "failed"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Options(_Request):
    """How to judge: every field optional, the service's settings fill the rest."""

    policy: str | None = Field(None, description="Policy YAML text (one set).")
    policy_set: str | None = Field(None, description="A registered set name (GET /v1/policies).")
    policy_version: int | None = Field(None, ge=1, le=MAX_VERSION,
                                       description="Pin a version of policy_set "
                                       "(default: its latest).")
    mode: Mode | None = None
    keep_ratio: float | None = Field(None, gt=0.0, le=1.0)
    frames: int | None = Field(None, ge=1, description="Frames per window.")

    @field_validator("frames", "keep_ratio", "policy_version", mode="before")
    @classmethod
    def _not_a_bool(cls, value):
        """JSON `true` is not 1 (pydantic's lax mode would take it)."""
        if isinstance(value, bool):
            raise ValueError("must be a number, not a boolean")
        return value


class ModerateJSON(Options):
    """POST /v1/moderate as JSON: exactly one of `video_base64` or `video_url`."""

    video_base64: str | None = Field(None, description="The video file, base64.")
    video_url: str | None = Field(
        None, description="data: URL, or an allow-listed http(s) URL or file:// path.")


class JobJSON(ModerateJSON):
    """POST /v1/jobs as JSON."""

    webhook_url: str | None = Field(None, description="POSTed the job when it ends.")


# --- OpenAI-compatible moderation ----------------------------------------------------------------

class MediaURL(BaseModel):
    url: str


class VideoPart(BaseModel):
    type: Literal["video_url"]
    video_url: MediaURL


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: MediaURL


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


Part = VideoPart | ImagePart | TextPart


class ModerationsRequest(BaseModel):
    """OpenAI's moderation request; `policy`/`policy_set`/... may come through `extra_body`."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    input: str | list[str] | list[Part] = Field(
        description="video_url / image_url parts (text is not judged).")
    policy: str | None = None
    policy_set: str | None = None
    policy_version: int | None = Field(None, ge=1, le=MAX_VERSION)
    mode: Mode | None = None
    keep_ratio: float | None = Field(None, gt=0.0, le=1.0)
    frames: int | None = Field(None, ge=1)

    def options(self) -> Options:
        return Options(policy=self.policy, policy_set=self.policy_set,
                       policy_version=self.policy_version, mode=self.mode,
                       keep_ratio=self.keep_ratio, frames=self.frames)


class ModerationResult(BaseModel):
    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]
    category_applied_input_types: dict[str, list[str]]

    @classmethod
    def of(cls, verdict: Verdict, input_type: str) -> ModerationResult:
        cats = verdict.categories
        return cls(flagged=verdict.flagged,
                   categories={c.name: c.flagged for c in cats},
                   category_scores={c.name: c.score for c in cats},
                   category_applied_input_types={c.name: [input_type] for c in cats})


class ModerationsResponse(BaseModel):
    id: str
    model: str
    results: list[ModerationResult]


# --- jobs, policies, health -------------------------------------------------------------------

class ErrorInfo(BaseModel):
    type: str
    message: str


class ErrorBody(BaseModel):
    """Every error reply: `{"error": {"type": ..., "message": ...}}`."""

    error: ErrorInfo


class JobCreated(BaseModel):
    id: str
    status: JobStatus


class JobView(BaseModel):
    id: str
    status: JobStatus
    verdict: Verdict | None = None
    error: ErrorInfo | None = None
    created_at: str
    updated_at: str


class CategoryInfo(BaseModel):
    id: str
    name: str
    threshold: float
    severity: str | None = None


class PolicySetInfo(BaseModel):
    name: str
    version: int
    description: str | None
    default: bool
    categories: list[CategoryInfo]


class PolicyVersion(BaseModel):
    version: int
    hash: str
    created_at: str | None = Field(description="When it was registered; null for the file "
                                   "version loaded at start.")


class PolicyVersions(BaseModel):
    name: str
    versions: list[PolicyVersion]


class PolicyDetail(BaseModel):
    name: str
    version: int
    hash: str
    categories: list[CategoryInfo]
    yaml: str | None = Field(None, description="The registered YAML text (null in PUT replies).")


class PolicyList(BaseModel):
    default: str
    policy_sets: list[PolicySetInfo]


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    model: str | None = None
    policy_set: str | None = None
    store: Literal["ok", "unavailable"] = "ok"


# --- review console -----------------------------------------------------------------------------

ReviewStatus = Literal["pending", "reviewed"]


class ReviewDecision(BaseModel):
    labels: list[str] = Field(description="Category ids that apply; [] = benign.")
    note: str
    reviewer: str | None = Field(description="The reviewer's API key id (null without keys).")
    reviewed_at: str


class ReviewSummary(BaseModel):
    id: str
    created_at: str
    status: ReviewStatus
    flagged: bool = Field(description="The model's verdict.")
    policy_set: str
    verdict: Verdict


class ReviewList(BaseModel):
    items: list[ReviewSummary] = Field(description="Newest first.")
    next: str | None = Field(description="Cursor of the next page; null on the last one.")


class ReviewFacets(BaseModel):
    policy_sets: list[str] = Field(description="Policy sets of the items this key may read.")
    categories: list[str] = Field(description="Category ids the model flagged in them.")


class ReviewFrame(BaseModel):
    window: int = Field(description="Index into the verdict's segments.")
    k: int = Field(description="GET /v1/reviews/{id}/frames/{k} is its JPEG thumbnail.")
    t_s: float = Field(description="Seconds from the start of the video.")


class ReviewDetail(ReviewSummary):
    source: str = Field(description="The job id, or 'moderate' for a synchronous call.")
    frames: list[ReviewFrame]
    review: ReviewDecision | None = Field(description="The current decision; null while "
                                          "pending.")
    history: list[ReviewDecision] = Field(description="Every decision, oldest first.")


class ReviewPost(_Request):
    labels: list[str] = Field(max_length=256, description="Category ids that apply to the "
                              "video; [] = benign.")
    note: str = Field("", max_length=4000)
