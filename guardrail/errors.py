"""Typed errors raised at the engine's boundaries, and their exit codes / HTTP statuses.

Every error a user can cause is one of these. The CLI maps them to exit codes and the HTTP
service to statuses in one place each (`exit_code`, `http_status`), so a failure is never
reported as success and never as a traceback.
"""

from __future__ import annotations


class GuardrailError(Exception):
    """Base of every error guardrail raises on purpose. `str(err)` is one line."""

    exit_code = 1
    http_status = 500
    kind = "internal_error"


class UsageError(GuardrailError):
    """Bad flags, arguments or settings."""

    exit_code = 2
    http_status = 400
    kind = "invalid_request"


class PolicyError(GuardrailError):
    """A policy file that cannot be used; carries every problem found, each as `file:line: msg`."""

    exit_code = 2
    http_status = 422
    kind = "invalid_policy"

    def __init__(self, messages: list[str] | str):
        self.messages = [messages] if isinstance(messages, str) else list(messages)
        assert self.messages, "PolicyError needs at least one message"
        super().__init__("; ".join(self.messages))



class PromptTooLongError(PolicyError):
    """A policy set whose prompt cannot fit the model's context (refused before any tensor)."""

    http_status = 413
    kind = "prompt_too_long"

class VideoError(GuardrailError):
    """A video that cannot be judged: corrupt, empty, not a video, over a limit."""

    exit_code = 3
    http_status = 422
    kind = "invalid_video"


class VideoTooLargeError(VideoError):
    """Over a configured limit (bytes, duration, pixels)."""

    http_status = 413
    kind = "video_too_large"


class UnsupportedVideoError(VideoError):
    """Not a video at all (text, image bytes, audio only, unknown container)."""

    http_status = 415
    kind = "unsupported_media"


class ModelError(GuardrailError):
    """A model that cannot be found, loaded or run."""

    exit_code = 2
    http_status = 503
    kind = "model_unavailable"
