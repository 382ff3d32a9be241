"""Prometheus metrics of one app instance (its own registry: no process-global state)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from guardrail.verdict import Verdict

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
STAGES = ("decode_video", "prefill", "verdict", "generate", "total")
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("guardrail_requests", "HTTP requests by route and status.",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("guardrail_request_seconds", "HTTP request latency.",
                                 ["route"], buckets=_SECONDS, registry=r)
        self.stages = Histogram("guardrail_stage_seconds",
                                "Per-stage latency of judged videos (the verdict's timing_ms).",
                                ["stage"], buckets=_SECONDS, registry=r)
        self.queue = Gauge("guardrail_queue_depth",
                           "Work waiting or running: requests in this ingress, engine calls "
                           "in flight from it, queued jobs.", ["queue"], registry=r)
        self.videos = Counter("guardrail_videos_judged", "Videos judged.",
                              ["policy_set", "mode", "flagged"], registry=r)
        self.flags = Counter("guardrail_flags", "Flagged categories.",
                             ["policy_set", "category"], registry=r)
        self.jobs = Gauge("guardrail_jobs", "Jobs in the store by status.", ["status"],
                          registry=r)
        self.store_up = Gauge("guardrail_store_up", "1 while the job store answers, 0 while "
                              "it cannot be read.", registry=r)
        self.decoded = Gauge("guardrail_decoded_frame_bytes", "Bytes of decoded frames held "
                             "now (load.decode_memory_bytes is the budget).", registry=r)
        self.webhooks = Counter("guardrail_webhook_deliveries", "Webhook delivery attempts.",
                                ["outcome"], registry=r)
        self.reviews = Counter("guardrail_review_items", "Verdicts kept for review, and "
                               "verdicts not kept (failed, or dropped: queue full).",
                               ["outcome"], registry=r)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_verdict(self, verdict: Verdict, policy_label: str) -> None:
        timing = verdict.timing_ms
        for stage in STAGES:
            self.stages.labels(stage).observe(getattr(timing, stage) / 1e3)
        self.videos.labels(policy_label, verdict.mode, str(verdict.flagged).lower()).inc()
        for c in verdict.categories:
            if c.flagged:
                self.flags.labels(policy_label, c.id).inc()

    def observe_review(self, outcome: str) -> None:
        """recorded | failed | dropped (the review queue was full)."""
        self.reviews.labels(outcome).inc()

    def set_depths(self, depths: dict[str, int]) -> None:
        for queue, n in depths.items():
            self.queue.labels(queue).set(n)

    def set_jobs(self, counts: dict[str, int]) -> None:
        for status in ("queued", "running", "succeeded", "failed"):
            self.jobs.labels(status).set(counts.get(status, 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
