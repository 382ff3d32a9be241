"""`Video`s from inputs: `probe` (metadata only), `load_video` (validate, pick a decoder, decode
the sampled frames of every window), `image_as_video` (one still image as a one-frame video) and
`load_media` (a file that is either).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import replace

import numpy as np
from PIL import Image, UnidentifiedImageError

from guardrail.errors import UnsupportedVideoError, VideoError, VideoTooLargeError
from guardrail.video.decoders import DECODERS, FrameDecoder, _backends, frame_changes
from guardrail.video.sampling import cfr_times, coverage_windows, plan_windows
from guardrail.video.shots import find_shots, plan_coverage
from guardrail.video.source import (
    VideoTimeoutError,
    _Deadline,
    _one_line,
    _resolve,
    _Source,
    _translate,
)
from guardrail.video.timeline import Timeline, read_timeline
from guardrail.video.types import (
    Clip,
    SamplingConfig,
    Video,
    VideoInfo,
    VideoLimits,
    VideoSource,
    Window,
    _require,
)
from guardrail.video.validate import _agree, _check_limits, _check_size, _probe_header

Reserve = Callable[[int], None]   # takes bytes from a memory budget; raises to refuse

# Frozen, hence safe to share as argument defaults.
_DEFAULT_SAMPLING, _DEFAULT_LIMITS = SamplingConfig(), VideoLimits()


def probe(source: VideoSource, limits: VideoLimits = _DEFAULT_LIMITS, backend: str = "auto"
          ) -> VideoInfo:
    """Validate `source` and read its metadata; `info.backend` names the decoder that opened it."""
    return _load(source, None, limits, backend).info


def load_video(source: VideoSource, sampling: SamplingConfig = _DEFAULT_SAMPLING,
               limits: VideoLimits = _DEFAULT_LIMITS, backend: str = "auto",
               reserve: Reserve | None = None) -> Video:
    """Decode the frames `sampling` picks in each window. `auto` tries decord, then PyAV if
    decord cannot open or decode the video. Frames shared by overlapping windows decode once.
    Frames larger than `limits.max_decode_pixels` are scaled down while decoding; frames over
    `limits.max_decoded_bytes` in all are VideoTooLargeError before any is decoded, and
    `reserve(nbytes)` (a memory budget shared with other work) is called with their size just
    before they are decoded (it raises to refuse)."""
    return _load(source, sampling, limits, backend, reserve=reserve)


def plan_video(source: VideoSource, sampling: SamplingConfig = _DEFAULT_SAMPLING,
               limits: VideoLimits = _DEFAULT_LIMITS, backend: str = "auto") -> Video:
    """What `load_video` would judge, without decoding the judged frames: the windows, the
    frames and times sampled in each (clips hold no pixels), shots and warnings. Coverage
    sampling still makes its pass over every frame."""
    return _load(source, sampling, limits, backend, read=False)


def load_media(path: str | os.PathLike, sampling: SamplingConfig = _DEFAULT_SAMPLING,
               limits: VideoLimits = _DEFAULT_LIMITS, backend: str = "auto") -> Video:
    """A file that may be a video or a still image: a still image (one frame Pillow reads, an
    animated GIF or WebP is a video) becomes a one-frame video, as the server treats it."""
    if _is_still_image(path):
        with open(path, "rb") as f:
            data = f.read(limits.max_bytes + 1)
        return image_as_video(data, limits)
    return load_video(path, sampling, limits, backend)


def check_media(path: str | os.PathLike, limits: VideoLimits = _DEFAULT_LIMITS) -> None:
    """Raise the VideoError `load_media` would raise at once for `path` (missing, not a
    regular file, empty, over the byte limit, not a video or image that can be opened, a
    header over the limits), without decoding more than one frame: for checking every input
    before a model loads."""
    src = _resolve(path, limits)
    if not _is_still_image(path):
        _probe_header(src, limits, _Deadline(limits.timeout_s))
        return
    with Image.open(path) as img:
        _check_size(*img.size, limits)


def _is_still_image(path: str | os.PathLike) -> bool:
    try:
        with Image.open(path) as img:
            return img.format != "GIF" and getattr(img, "n_frames", 1) == 1
    except (UnidentifiedImageError, OSError, ValueError):
        return False


def image_as_video(image: np.ndarray | bytes, limits: VideoLimits = _DEFAULT_LIMITS
                   ) -> Video:
    """One image (an encoded file's bytes, or a uint8 array [H, W] / [H, W, 3|4]) as a one-frame,
    one-second video."""
    if isinstance(image, np.ndarray):
        frame, codec, num_bytes = _image_array(image), "raw", image.nbytes
    else:
        frame, codec, num_bytes = _decode_image(bytes(image), limits)
    height, width = frame.shape[:2]
    _check_size(width, height, limits)
    info = VideoInfo("image", codec, 1.0, 1.0, width, height, 1, num_bytes, "image")
    window = Window(0.0, 1.0, (0,), (0.0,))
    return Video(info, (Clip(window, frame[None], 1.0),), sampling="image")


def _load(source: VideoSource, sampling: SamplingConfig | None, limits: VideoLimits,
          backend: str, read: bool = True, reserve: Reserve | None = None) -> Video:
    names = _backends(backend)
    deadline = _Deadline(limits.timeout_s)
    reserve = _once(reserve) if reserve is not None else None    # one video, one reservation
    src = _resolve(source, limits)
    header = _probe_header(src, limits, deadline)
    timeline = read_timeline(src, deadline, header.fps, header.duration_s)
    for name in names:
        try:
            return _decode_with(DECODERS[name], src, header, timeline, sampling, limits,
                                deadline, read, reserve)
        except (VideoTimeoutError, VideoTooLargeError):
            raise
        except VideoError:
            if name == names[-1]:
                raise
    raise AssertionError("no video backend installed")


def _decode_with(decoder_cls: type[FrameDecoder], src: _Source, header: VideoInfo,
                 timeline: Timeline, sampling: SamplingConfig | None, limits: VideoLimits,
                 deadline: _Deadline, read: bool = True, reserve: Reserve | None = None
                 ) -> Video:
    """Open `src` with one decoder, settle frame count and duration, decode what `sampling`
    picks (for coverage, after a pass over every frame that finds the shots)."""
    size = limits.decode_size(header.width, header.height)
    with _translate(f"{decoder_cls.name} could not decode the video"):
        decoder = decoder_cls(src, header, deadline, timeline, size)
        try:
            info = _settle(header, timeline, decoder.num_frames, decoder_cls.name)
            _require(info.num_frames > 0, "no video frames", VideoError)
            _check_limits(info, limits)
            if sampling is None:
                return Video(info, (), warnings=timeline.warnings)
            times = timeline.times_s if timeline.num_frames == info.num_frames else cfr_times(
                info)
            shots, warnings = None, timeline.warnings
            if sampling.mode == "coverage":
                found = find_shots(frame_changes(src, timeline, deadline), times,
                                   info.duration_s)
                plan = plan_coverage(found, info.duration_s, sampling.min_shot_s,
                                     sampling.max_gap_s, sampling.frame_budget)
                windows = coverage_windows(times, plan.times_s, info.duration_s,
                                           sampling.num_frames)
                shots, warnings = len(found), (*warnings, *plan.warnings)
            else:
                windows = plan_windows(info, sampling, times)
            wanted = sorted({i for window in windows for i in window.indices})
            if read:
                _budget(len(wanted), size, limits, reserve)
            frames = (decoder.read(wanted) if read else    # [len(wanted), H, W, 3]
                      np.zeros((len(wanted), 0, 0, 3), np.uint8))
            deadline.check("decoding")
        finally:
            decoder.close()
    row = {index: r for r, index in enumerate(wanted)}
    clips = tuple(Clip(w, frames if list(w.indices) == wanted else   # one window: no copy
                       frames[[row[i] for i in w.indices]], info.fps) for w in windows)
    return Video(info, clips, sampling.mode, shots, warnings)


def _once(reserve: Reserve) -> Reserve:
    """`reserve` asked only for bytes not asked for before (a decoder that fails after its
    reservation hands over to the next, which needs the same frames)."""
    taken = 0

    def more(nbytes: int) -> None:
        nonlocal taken
        if nbytes > taken:
            reserve(nbytes - taken)
            taken = nbytes
    return more


def _budget(count: int, size: tuple[int, int], limits: VideoLimits,
            reserve: Reserve | None) -> None:
    """Refuse frames over the per-video budget, then take their bytes from `reserve`'s."""
    width, height = size
    nbytes = count * width * height * 3
    _require(nbytes <= limits.max_decoded_bytes, f"{count} frames of {width}x{height} take "
             f"{nbytes >> 20} MiB decoded, over the limit of {limits.max_decoded_bytes >> 20} "
             "MiB: ask for fewer frames", VideoTooLargeError)
    if reserve is not None:
        reserve(nbytes)


def _settle(header: VideoInfo, timeline: Timeline, counted: int, backend: str) -> VideoInfo:
    """The header's metadata with the frames the stream really has: the timeline's count and
    playback duration where its packets carry timestamps; otherwise the decoder's count, and a
    header duration that disagrees with it recomputed from it."""
    if timeline.timed and timeline.num_frames:
        return replace(header, num_frames=timeline.num_frames, duration_s=timeline.end_s,
                       backend=backend)
    num_frames, duration = counted or timeline.num_frames or header.num_frames, header.duration_s
    if not (duration and _agree(num_frames, duration, header.fps)):
        duration = num_frames / header.fps
    return replace(header, num_frames=num_frames, duration_s=duration, backend=backend)


def _image_array(image: np.ndarray) -> np.ndarray:
    _require(image.dtype == np.uint8 and (image.ndim == 2 or (
        image.ndim == 3 and image.shape[2] in (1, 3, 4))),
        f"an image array must be uint8 [H, W] or [H, W, 3|4], not {image.dtype} {image.shape}")
    if image.ndim == 2:
        image = image[:, :, None]
    return np.ascontiguousarray(np.broadcast_to(image[:, :, :3], (*image.shape[:2], 3)))


def _decode_image(data: bytes, limits: VideoLimits) -> tuple[np.ndarray, str, int]:
    """RGB pixels of an encoded image, scaled down to `limits.max_decode_pixels` (JPEG: while
    decoding)."""
    _require(0 < len(data) <= limits.max_bytes, f"image is {len(data)} bytes; it must be 1 to "
             f"{limits.max_bytes}", VideoTooLargeError if data else UnsupportedVideoError)
    try:
        with Image.open(io.BytesIO(data)) as img:
            _check_size(*img.size, limits)
            size, fmt = limits.decode_size(*img.size), (img.format or "unknown").lower()
            if size != img.size:
                img.draft("RGB", size)           # JPEG: decode at a fraction of the size
                img = img.convert("RGB").resize(size, Image.Resampling.BILINEAR)
            return np.array(img.convert("RGB")), fmt, len(data)   # writable, as frames are
    except VideoError:
        raise
    except Image.DecompressionBombError as err:
        raise VideoTooLargeError(f"image is over Pillow's size limit ({err})") from err
    except Exception as err:  # PIL raises many types on bad bytes
        raise UnsupportedVideoError(f"not an image Pillow can read ({_one_line(err)})") from err
