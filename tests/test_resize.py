"""Pillow's bicubic resize as tensor math (`guardrail.video.resize`), which the InternVL adapter
runs on a GPU: equal to Pillow bit for bit, so SafeWatch's preprocessing holds on the device."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from guardrail.engine import GuardEngine
from guardrail.video import load_video, resize
from guardrail.video.resize import resize_like_pillow


def _pillow(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BICUBIC))
                     for f in frames])


@pytest.mark.parametrize(("shape", "size"), [
    ((2, 48, 64), (448, 448)),      # up (the tiny test videos into InternVL's 448)
    ((1, 480, 640), (448, 448)),    # down, antialiased
    ((2, 37, 53), (20, 31)),        # odd sizes, down on both axes
    ((1, 60, 90), (90, 30)),        # one axis unchanged: Pillow skips that pass
    ((1, 31, 17), (64, 9)),         # wider and shorter: Pillow 13's vertical pass first
    ((1, 17, 31), (9, 64)),         # narrower and taller
    ((1, 640, 360), (448, 448)),    # a portrait phone video into InternVL's 448
    ((1, 1280, 720), (448, 448)),   # portrait, both shrink: Pillow 13 goes vertical first
    ((1, 1920, 1080), (448, 448)),
    ((1, 720, 1280), (448, 448)),   # the same videos in landscape
])
def test_equals_pillow_bit_for_bit(shape, size):
    assert resize.exact(*shape[1:], size)   # the installed Pillow's pass order was found
    rng = np.random.default_rng(sum(shape))
    frames = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)       # noise: the hardest case
    got = resize_like_pillow(torch.from_numpy(frames), size)          # [N, 3, h, w]
    assert got.shape == (shape[0], 3, size[1], size[0])
    want = _pillow(frames, size)
    assert np.array_equal(got.permute(0, 2, 3, 1).numpy().astype(np.uint8), want)
    assert float(got.min()) >= 0 and float(got.max()) <= 255


def test_random_shapes_equal_pillow():
    """Sizes up and down on either axis, as frames of any shape meet a model's square."""
    rng = np.random.default_rng(7)
    for _ in range(40):
        h, w, out_h, out_w = (int(x) for x in rng.integers(8, 90, 4))
        frames = rng.integers(0, 256, (1, h, w, 3), dtype=np.uint8)
        got = resize_like_pillow(torch.from_numpy(frames), (out_w, out_h))
        assert np.array_equal(got.permute(0, 2, 3, 1).numpy().astype(np.uint8),
                              _pillow(frames, (out_w, out_h))), (h, w, out_h, out_w)


@pytest.fixture(scope="module")
def engine(tiny_model) -> GuardEngine:
    return GuardEngine.from_pretrained(tiny_model("internvl"))


def test_internvl_pixels_on_the_device_equal_pillows(engine, video_files, monkeypatch):
    """The adapter's device path (what a GPU runs) gives the host path's pixels exactly, and
    so the same scores."""
    adapter = engine.adapter
    video = load_video(video_files["mp4_h264"])
    clip = video.clips[0]
    monkeypatch.setattr(adapter, "resize_on_device", False)
    host = adapter.video_inputs(clip).encoder_inputs["pixel_values"]
    scores = engine.judge([clip])[0][0].scores
    monkeypatch.setattr(adapter, "resize_on_device", True)
    device = adapter.video_inputs(clip).encoder_inputs["pixel_values"]
    assert device.dtype == host.dtype and torch.equal(device, host)
    assert torch.equal(engine.judge([clip])[0][0].scores, scores)
    odd = dataclasses.replace(clip, frames=np.ascontiguousarray(clip.frames[:, :47, :61]))
    assert torch.equal(adapter.video_inputs(odd).encoder_inputs["pixel_values"],
                       adapter._pixels(odd.frames))
    monkeypatch.setattr(adapter, "resize_on_device", False)
    assert torch.equal(adapter._pixels_on_device(odd.frames), adapter._pixels(odd.frames))
