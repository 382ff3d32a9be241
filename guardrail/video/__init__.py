"""Video input: probe a file or bytes, plan sampling windows, decode the sampled frames.

    probe(source) -> VideoInfo --plan_windows(info, sampling)--> Window... --load_video--> Video

PyAV validates every input first (container opens, has a video stream, sane size, one frame
decodes); only then does the chosen decoder (decord, else PyAV) see it. Every failure is a
`VideoError` subclass with a one-line message, raised within `VideoLimits.timeout_s`.

Modules, in data-flow order: `types` (the dataclasses), `source` (the input resolved once, the
deadline, one-line errors), `validate` (the header PyAV checked), `sampling` (`plan_windows`),
`decoders` (the `FrameDecoder` protocol and the `DECODERS` registry), `loader` (`probe`,
`load_video`, `image_as_video`).
"""

from __future__ import annotations

from guardrail.video.decoders import DECODERS, DecordDecoder, FrameDecoder, PyAVDecoder
from guardrail.video.loader import (
    check_media,
    image_as_video,
    load_media,
    load_video,
    plan_video,
    probe,
)
from guardrail.video.sampling import plan_windows
from guardrail.video.source import VideoTimeoutError
from guardrail.video.source import _Deadline as _Deadline  # for tests
from guardrail.video.source import _resolve as _resolve  # for tests
from guardrail.video.types import (
    SAMPLING_MODES,
    Clip,
    SamplingConfig,
    Video,
    VideoInfo,
    VideoLimits,
    VideoSource,
    Window,
)

__all__ = [
    "DECODERS",
    "SAMPLING_MODES",
    "Clip",
    "DecordDecoder",
    "FrameDecoder",
    "PyAVDecoder",
    "SamplingConfig",
    "Video",
    "VideoInfo",
    "VideoLimits",
    "VideoSource",
    "VideoTimeoutError",
    "Window",
    "check_media",
    "image_as_video",
    "load_media",
    "load_video",
    "plan_video",
    "plan_windows",
    "probe",
]
