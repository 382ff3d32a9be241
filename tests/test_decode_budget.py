"""Decoded frames have a memory budget: frames larger than `max_decode_pixels` are scaled down
while decoding (both decoders, and still images), the frames of one video over
`max_decoded_bytes` are refused before any is decoded, and a shared budget (`reserve`) is asked
for their bytes first."""

from __future__ import annotations

import io

import numpy as np
import pytest
import videos
from PIL import Image

from guardrail.errors import GuardrailError, VideoTooLargeError
from guardrail.video import SamplingConfig, VideoLimits, image_as_video, load_video
from guardrail.video.decoders import DECODERS

SMALL = VideoLimits(max_decode_pixels=64 * 48)


class Full(GuardrailError):
    """What a budget raises to refuse (the service's is a 429)."""


@pytest.fixture(scope="module")
def large_clip(tmp_path_factory):
    """30 frames of 256x192 whose bars spell each frame's index."""
    data = videos.encode_video("mp4_h264", num_frames=30, fps=10, width=256, height=192)
    return videos.write(tmp_path_factory.mktemp("large"), "large.mp4", data)


def test_decode_size_keeps_the_aspect_and_the_budget():
    assert SMALL.decode_size(64, 48) == (64, 48)                 # within: untouched
    assert SMALL.decode_size(256, 192) == (64, 48)
    w, h = VideoLimits().decode_size(4096, 4096)
    assert w == h and w * h <= 1920 * 1080 and w > 1400
    w, h = SMALL.decode_size(4000, 300)
    assert w * h <= 64 * 48 and abs(w / h - 4000 / 300) / (4000 / 300) < 0.05


@pytest.mark.parametrize("backend", [name for name, cls in DECODERS.items() if cls.available()])
def test_large_frames_are_scaled_down_while_decoding(large_clip, backend):
    sampling = SamplingConfig(num_frames=6)
    full = load_video(large_clip, sampling, backend=backend)
    small = load_video(large_clip, sampling, SMALL, backend=backend)
    assert full.clips[0].frames.shape == (6, 192, 256, 3)
    assert small.clips[0].frames.shape == (6, 48, 64, 3)
    assert small.info.width == 256 and small.info.height == 192     # the video's own size
    got = [videos.frame_index(f) for f in small.clips[0].frames]
    assert got == [videos.frame_index(f) for f in full.clips[0].frames]   # the same frames


def test_a_still_image_is_scaled_down_too():
    frame = videos.make_frame(5, 256, 192)
    out = io.BytesIO()
    Image.fromarray(frame).save(out, format="JPEG", quality=95)
    video = image_as_video(out.getvalue(), SMALL)
    assert video.clips[0].frames.shape == (1, 48, 64, 3)
    assert videos.frame_index(video.clips[0].frames[0]) == 5


def test_frames_over_the_per_video_budget_are_refused_before_decoding(large_clip, monkeypatch):
    decoded = []
    for cls in DECODERS.values():
        monkeypatch.setattr(cls, "read", lambda self, idx, _r=cls.read: decoded.append(1) or
                            _r(self, idx))
    limits = VideoLimits(max_decode_pixels=64 * 48, max_decoded_bytes=5 * 64 * 48 * 3)
    with pytest.raises(VideoTooLargeError, match=r"6 frames of 64x48 .* over the limit"):
        load_video(large_clip, SamplingConfig(num_frames=6), limits)
    assert not decoded
    assert load_video(large_clip, SamplingConfig(num_frames=5), limits).clips[0].frames.shape[0] \
        == 5


def test_the_shared_budget_is_asked_for_the_frames_bytes_first(large_clip):
    asked = []

    def reserve(nbytes: int) -> None:
        asked.append(nbytes)
        raise Full("budget full")

    with pytest.raises(Full, match="budget full"):
        load_video(large_clip, SamplingConfig(num_frames=4), SMALL, reserve=reserve)
    assert asked == [4 * 64 * 48 * 3]
    ok = []
    video = load_video(large_clip, SamplingConfig(num_frames=4), SMALL, reserve=ok.append)
    assert ok == [video.clips[0].frames.nbytes] and np.asarray(video.clips[0].frames).any()
