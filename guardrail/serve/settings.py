"""Service settings: the `args` of the application in a Serve config file (deploy/serve.yaml).

One pydantic model, so a typo in the YAML is an error naming the key. The same settings drive the
in-process app (`create_app`), the Ray Serve deployments and the `serve(...)` command.
"""

from __future__ import annotations

import ipaddress
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from guardrail.engine import MODES, EngineConfig, engine_class
from guardrail.errors import UsageError
from guardrail.prompt import LAYOUTS
from guardrail.shipped import shipped_dir
from guardrail.video import SamplingConfig, VideoLimits

SHIPPED_POLICIES = shipped_dir("policies")
API_KEYS_ENV = "GUARDRAIL_API_KEYS"
ADMIN_KEYS_ENV = "GUARDRAIL_ADMIN_KEYS"
DB_URL_ENV = "GUARDRAIL_DB_URL"


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(_Settings):
    max_upload_bytes: int = Field(256 << 20, gt=0, description="Largest video accepted, bytes.")
    max_duration_s: float = Field(4 * 3600, gt=0, description="Longest video accepted.")
    max_pixels: int = Field(4096 * 4096, gt=0, description="Largest frame, width * height.")
    decode_timeout_s: float = Field(60.0, gt=0, description="Bound on probing + decoding.")
    max_frames: int = Field(64, ge=1, description="Largest `frames` a request may ask for.")
    max_inputs: int = Field(16, ge=1, description="Media parts per /v1/moderations call.")
    max_decode_pixels: int = Field(1920 * 1080, gt=0, description="Frames are scaled down "
                                   "to at most this many pixels while decoding (aspect kept).")
    max_decoded_bytes: int = Field(1 << 30, gt=0, description="Decoded frames of one video, "
                                   "bytes (frames x width x height x 3 after scaling); over "
                                   "it: 413.")
    max_prompt_tokens: int = Field(16384, ge=256, description="Longest prompt of one window "
                                   "(policies and text + its video tokens), tokens, below the "
                                   "model's context: prefill cost grows with its square. An "
                                   "inline `policy` or a registered set whose text alone "
                                   "reaches it, or a window over it: 413 (engine transformers; "
                                   "vllm: the policy text, and vllm.max_model_len).")

    def video_limits(self) -> VideoLimits:
        return VideoLimits(max_bytes=self.max_upload_bytes, max_duration_s=self.max_duration_s,
                           max_pixels=self.max_pixels, timeout_s=self.decode_timeout_s,
                           max_decode_pixels=self.max_decode_pixels,
                           max_decoded_bytes=self.max_decoded_bytes)

    @property
    def max_body_bytes(self) -> int:
        """Largest request body: a base64 upload (4/3 of the bytes) plus room for the rest."""
        return self.max_upload_bytes * 4 // 3 + (4 << 20)


class Sampling(_Settings):
    mode: Literal["uniform", "fps", "coverage"] = Field(
        "coverage", description="How frames are chosen, by presentation time. coverage (the "
        "default: uploaders time content to fall between uniformly sampled frames): a pass "
        "over every frame finds the shots, every shot of min_shot_s or more gets a judged "
        "frame and no gap between judged frames exceeds max_gap_s; uniform: `frames` per "
        "window; fps: `fps` per second.")
    fps: float = Field(1.0, gt=0, description="fps mode: frames per second.")
    max_frames: int | None = Field(64, ge=1, description="coverage: frames judged per video "
                                   "(past it the verdict warns that coverage was cut); fps: "
                                   "per window.")
    min_shot_s: float = Field(0.5, gt=0, description="coverage: shortest shot that must get a "
                              "judged frame.")
    max_gap_s: float = Field(5.0, gt=0, description="coverage: longest time between judged "
                             "frames.")


class Batching(_Settings):
    max_batch_size: int = Field(4, ge=1, description="Videos per engine.check_batch call.")
    batch_wait_timeout_s: float = Field(0.02, ge=0, description="Wait to fill a batch.")


class Load(_Settings):
    max_inflight: int = Field(32, ge=1, description="Requests decoding or judging per ingress.")
    max_queued: int = Field(16, ge=0, description="Local engine: requests waiting for it.")
    decode_workers: int = Field(2, ge=1, description="Threads decoding videos per ingress.")
    decode_memory_bytes: int = Field(2 << 30, gt=0, description="Decoded frames held at once "
                                     "per ingress (decoding, waiting for and inside the "
                                     "model); a request that would go over it: 429.")
    max_inflight_per_key: int = Field(8, ge=1, description="Requests one API key may have in "
                                      "flight (requests without a valid key share one such "
                                      "share); the rest: 429.")
    body_timeout_s: float = Field(60.0, gt=0, description="A request body must arrive within "
                                  "this plus the time its declared length takes at "
                                  "min_body_rate (408 after).")
    min_body_rate: int = Field(16384, ge=0, description="Bytes/s a request body must keep up "
                               "after its first 5 s (408 below; 0: no pace rule).")
    retry_after_s: int = Field(1, ge=0, description="Retry-After on 429/503 replies.")
    request_timeout_s: float = Field(120.0, gt=0, description="Bound on one moderation call.")
    drain_timeout_s: float = Field(60.0, ge=0, description="On SIGTERM: stop accepting, give "
                                   "in-flight requests this long to finish, then exit (running "
                                   "jobs go back to the queue).")


class Jobs(_Settings):
    db_url: str | None = Field(None, description="Job store: sqlite:///path or postgresql://"
                               "user@host/db (shared by every ingress replica on any node); "
                               "default: sqlite at db_path.")
    db_path: str = Field("guardrail-jobs.sqlite", description="SQLite file when db_url is not "
                         "set; created if missing.")
    spool_dir: str | None = Field(None, description="Uploaded job inputs (SQLite) or local "
                                  "copies of them (PostgreSQL); default <db>.inputs (SQLite), "
                                  "<tempdir>/guardrail-job-inputs-<hash of the URL> (PostgreSQL: "
                                  "one folder the replicas on a machine share).")
    workers: int = Field(1, ge=0, description="Jobs run at once per ingress (0: accept only).")
    max_queued: int = Field(1000, ge=1, description="Queued jobs before POST /v1/jobs is 429.")
    lease_s: float = Field(30.0, gt=0, description="A running job not renewed this long resumes.")
    max_attempts: int = Field(3, ge=1, description="Runs of one job before it fails for good.")
    timeout_s: float = Field(3600.0, gt=0, description="Bound on one job.")
    poll_s: float = Field(0.5, gt=0, description="Idle runner poll interval.")
    webhook_attempts: int = Field(6, ge=1, description="Deliveries tried per webhook.")
    webhook_backoff_s: float = Field(1.0, gt=0, description="First retry delay; doubles after.")
    webhook_max_backoff_s: float = Field(300.0, gt=0)
    webhook_timeout_s: float = Field(10.0, gt=0)
    webhook_allow: list[str] = Field(
        default_factory=lambda: ["http://", "https://"],
        description="URL prefixes a webhook_url may use. A bare scheme allows public "
                    "addresses only; an entry naming a host allows that host wherever it points.")

    def url(self) -> str:
        """The store's URL: db_url, else $GUARDRAIL_DB_URL (keeps a password out of the
        config), else the SQLite file db_path."""
        return self.db_url or os.environ.get(DB_URL_ENV) or self.db_path

    def postgres(self) -> bool:
        return self.url().startswith(("postgresql://", "postgres://"))

    def spool(self) -> Path:
        """Where uploads wait and job inputs live (SQLite) or are copied to (PostgreSQL). One
        folder per store, the same for every replica and restart, so a start cleans up what an
        earlier process left behind."""
        if self.spool_dir:
            return Path(self.spool_dir)
        if self.postgres():          # local copies only: one folder per database
            import hashlib
            from urllib.parse import parse_qsl, urlencode, urlsplit

            u = urlsplit(self.url())
            netloc = f"{u.username or ''}@{u.netloc.rpartition('@')[2]}"
            query = urlencode([(k, v) for k, v in parse_qsl(u.query) if k != "password"])
            key = f"{u.scheme}://{netloc}{u.path}?{query}"     # no password in the name
            digest = hashlib.sha256(key.encode()).hexdigest()[:12]
            return Path(tempfile.gettempdir()) / f"guardrail-job-inputs-{digest}"
        return Path(self.url().removeprefix("sqlite:///") + ".inputs")


class Review(_Settings):
    record: Literal["none", "flagged", "all"] = Field(
        "flagged", description="Which /v1/moderate and /v1/moderations verdicts are kept for "
        "the review console (job verdicts always are).")
    max_items: int = Field(10_000, ge=1, description="Items kept; past it the oldest reviewed "
                           "ones go first, then the oldest pending.")
    max_frames: int = Field(64, ge=1, description="Thumbnails kept per item (spread evenly "
                            "over the windows when the model saw more frames).")

    def records(self, flagged: bool, job: bool) -> bool:
        return job or self.record == "all" or (self.record == "flagged" and flagged)


class ServiceSettings(_Settings):
    """Everything the HTTP service needs to know; `args:` in deploy/serve.yaml."""

    model: str | None = Field(None, description="Model dir or hub id; default $GUARDRAIL_MODEL.")
    device: str = "auto"
    dtype: str = "auto"
    attn: str = "auto"
    engine: Literal["transformers", "vllm"] = Field(
        "transformers", description="transformers: our runner (every layout, pruning); vllm: "
        "vLLM's engine in the model replica (layouts sequential and isolated).")
    vllm: dict[str, Any] = Field(default_factory=dict, description="engine vllm: settings "
                                 "passed to vllm.LLM (tensor_parallel_size, "
                                 "gpu_memory_utilization, max_model_len, enforce_eager, ...).")
    policies_dir: str = Field(str(SHIPPED_POLICIES), description="Registered policy sets (*.yaml).")
    policy_set: str = Field("safewatch", description="Set used when a request names none.")
    layout: str = "parallel"
    mode: str = "fast"
    frames: int = Field(8, ge=1, description="Frames per window unless a request says.")
    sampling: Sampling = Field(default_factory=Sampling)
    window_s: float | None = Field(None, gt=0, description="Judge long videos in windows.")
    max_new_tokens: int = Field(256, ge=1)
    keep_ratio: float = Field(1.0, gt=0, le=1, description="PVTP share of video tokens kept.")
    pruning_mode: str = Field("kv", description="kv | pre_prefill")
    batch_size: int = Field(8, ge=1, description="Windows per forward pass in the engine.")
    decoder: str = "auto"
    host: str | None = Field(None, description="Interface the HTTP proxy binds; None = unknown.")
    api_keys: list[str] = Field(default_factory=list, description=f"Also ${API_KEYS_ENV}.")
    admin_keys: list[str] = Field(default_factory=list, description=f"Keys that may read every "
                                  f"job (and change policies); also ${ADMIN_KEYS_ENV}.")
    allow_paths: list[str] = Field(default_factory=list, description="Readable server dirs.")
    allow_urls: list[str] = Field(default_factory=list, description="Fetchable URL prefixes.")
    limits: Limits = Field(default_factory=Limits)
    load: Load = Field(default_factory=Load)
    batching: Batching = Field(default_factory=Batching)
    jobs: Jobs = Field(default_factory=Jobs)
    review: Review = Field(default_factory=Review)

    @model_validator(mode="after")
    def _known_choices(self) -> ServiceSettings:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}")
        if self.vllm and self.engine != "vllm":
            raise ValueError("vllm settings apply to engine: vllm only")
        try:       # what the chosen engine cannot run, before any model loads
            engine_class(self.engine)._check_config(
                EngineConfig(layout=self.layout, keep_ratio=self.keep_ratio))
        except UsageError as err:
            raise ValueError(str(err)) from None
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        if self.frames > self.limits.max_frames:
            raise ValueError("frames is over limits.max_frames")
        return self

    def sampling_config(self, frames: int | None = None) -> SamplingConfig:
        s = self.sampling
        return SamplingConfig(mode=s.mode, num_frames=frames or self.frames,
                              window_s=self.window_s, fps=s.fps, max_frames=s.max_frames,
                              min_shot_s=s.min_shot_s, max_gap_s=s.max_gap_s)

    def keys(self) -> frozenset[str]:
        """Every accepted key: API and admin keys from the settings and from $GUARDRAIL_API_KEYS
        and $GUARDRAIL_ADMIN_KEYS (comma-separated)."""
        extra = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",")]
        return frozenset(k for k in [*self.api_keys, *extra] if k) | self.admins()

    def admins(self) -> frozenset[str]:
        extra = [k.strip() for k in os.environ.get(ADMIN_KEYS_ENV, "").split(",")]
        return frozenset(k for k in [*self.admin_keys, *extra] if k)

    def check_auth(self) -> None:
        """API keys are optional on loopback and required on any other (or unknown) interface."""
        if not self.keys() and not is_loopback(self.host):
            where = self.host or "an unknown interface"
            raise UsageError(f"serving on {where} needs API keys: set ${API_KEYS_ENV} or "
                             "api_keys in the config, or bind to 127.0.0.1")


def is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
