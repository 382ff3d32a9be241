"""Fixtures the service's test modules share: the tiny Qwen2.5-VL engine and one mp4 upload.
Each module imports them, so each gets its own module-scoped engine."""

from __future__ import annotations

import pytest

from guardrail.engine import GuardEngine


@pytest.fixture(scope="module")
def engine(tiny_model) -> GuardEngine:
    return GuardEngine.from_pretrained(tiny_model("qwen2_5_vl"))


@pytest.fixture(scope="module")
def clip(video_files) -> bytes:
    return video_files["mp4_h264"].read_bytes()
