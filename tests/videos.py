"""Tiny generated videos for tests: each frame carries its own index, so sampling can be checked.

A frame is 16 black/white bars (two rows of 8, each bar 8 px wide): bit `b` of the frame index is
bar `b`. Bars survive lossy codecs, chroma subsampling and GIF palettes, so `frame_index(frame)`
reads the index back from any decoded frame.
"""

from __future__ import annotations

import io
import tempfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

WIDTH, HEIGHT = 64, 48
BITS = 16

# name -> (container format, codec, pixel format, file suffix)
FORMATS: dict[str, tuple[str, str, str, str]] = {
    "mp4_h264": ("mp4", "libx264", "yuv420p", ".mp4"),
    "webm_vp9": ("webm", "libvpx-vp9", "yuv420p", ".webm"),
    "avi_mjpeg": ("avi", "mjpeg", "yuvj420p", ".avi"),
    "gif": ("gif", "gif", "rgb8", ".gif"),
    "mkv_h264": ("matroska", "libx264", "yuv420p", ".mkv"),
    "mov_mpeg4": ("mov", "mpeg4", "yuv420p", ".mov"),
}

_CODEC_OPTIONS = {
    "libx264": {"crf": "10", "preset": "ultrafast", "g": "12", "bf": "2"},
    "libvpx-vp9": {"crf": "10", "b": "0", "deadline": "realtime", "cpu-used": "8", "g": "12"},
    "mpeg4": {"qscale": "2", "g": "12"},
    "mjpeg": {"qscale": "2"},
}


def make_frame(index: int, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """Frame whose bars spell `index` in binary. [H, W, 3] uint8."""
    assert 0 <= index < 1 << BITS, index
    frame = np.zeros((height, width, 3), np.uint8)
    bar_w, bar_h = width // 8, height // 2
    for bit in range(BITS):
        if index >> bit & 1:
            row, col = divmod(bit, 8)
            frame[row * bar_h : (row + 1) * bar_h, col * bar_w : (col + 1) * bar_w] = 255
    return frame


def frame_index(frame: np.ndarray) -> int:
    """Inverse of `make_frame` for a decoded frame [H, W, 3] (reads the centre of every bar)."""
    height, width = frame.shape[:2]
    bar_w, bar_h = width // 8, height // 2
    index = 0
    for bit in range(BITS):
        row, col = divmod(bit, 8)
        pixel = frame[row * bar_h + bar_h // 2, col * bar_w + bar_w // 2]
        index |= int(pixel.mean() > 127) << bit
    return index


def encode_video(
    fmt: str = "mp4_h264",
    num_frames: int = 30,
    fps: int = 10,
    width: int = WIDTH,
    height: int = HEIGHT,
    audio: bool = False,
    faststart: bool = False,
) -> bytes:
    """Encode frames 0..num_frames-1 (frame i = `make_frame(i)`) into one file's bytes."""
    container_fmt, codec, pix_fmt, suffix = FORMATS[fmt]
    options = {"movflags": "+faststart"} if faststart else {}
    # NOTE: +faststart rewrites the file after muxing, so it needs a real file, not BytesIO.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"video{suffix}"
        _encode(path, container_fmt, codec, pix_fmt, num_frames, fps, width, height, audio, options)
        return path.read_bytes()


def _encode(path, container_fmt, codec, pix_fmt, num_frames, fps, width, height, audio, options):
    with av.open(str(path), "w", format=container_fmt, options=options) as out:
        stream = out.add_stream(codec, rate=Fraction(fps), options=_CODEC_OPTIONS.get(codec, {}))
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if audio:
            audio_stream = out.add_stream("aac", rate=8000, layout="mono")
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(make_frame(i, width, height), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
        if audio:
            _mux_silence(out, audio_stream, seconds=num_frames / fps)


def encode_audio_only(seconds: float = 1.0) -> bytes:
    """A WAV file (no video stream)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="wav") as out:
        _mux_silence(out, out.add_stream("pcm_s16le", rate=8000, layout="mono"), seconds)
    return buf.getvalue()


def encode_zero_frame_video(fmt: str = "mkv_h264") -> bytes:
    """A container with a video stream declared but no frames in it."""
    container_fmt, codec, pix_fmt, _ = FORMATS[fmt]
    buf = io.BytesIO()
    with av.open(buf, "w", format=container_fmt) as out:
        stream = out.add_stream(codec, rate=10, options=_CODEC_OPTIONS.get(codec, {}))
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, pix_fmt
        out.start_encoding()  # writes the header even though no packet follows
    return buf.getvalue()


def encode_png(index: int = 5) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="image2pipe") as out:
        stream = out.add_stream("png", rate=1)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "rgb24"
        out.mux(stream.encode(av.VideoFrame.from_ndarray(make_frame(index), format="rgb24")))
        out.mux(stream.encode())
    return buf.getvalue()


def encode_raw_avi(num_frames: int = 3) -> bytes:
    """Uncompressed AVI: its frame size comes only from the header, so a patched header sticks."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="avi") as out:
        stream = out.add_stream("rawvideo", rate=10)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "rgb24"
        for i in range(num_frames):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(make_frame(i), format="rgb24")))
        out.mux(stream.encode())
    return buf.getvalue()


def elementary_h264(mp4: bytes) -> bytes:
    """The h264 stream of an mp4 as a raw Annex B stream: no timestamps, no frame count."""
    buf = io.BytesIO()
    with av.open(io.BytesIO(mp4)) as src, av.open(buf, "w", format="h264") as out:
        stream = out.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.size:
                packet.stream = stream
                out.mux(packet)
    return buf.getvalue()


def y4m_header_only(width: int, height: int) -> bytes:
    """A raw YUV4MPEG2 stream whose header claims `width` x `height` (one tiny bogus frame)."""
    return f"YUV4MPEG2 W{width} H{height} F10:1 Ip A1:1 C420jpeg\nFRAME\n".encode() + bytes(64)


def patch_avi_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the frame size in an AVI's `avih` and `strf` headers: a file lying about size."""
    out = bytearray(data)
    avih = out.index(b"avih") + 8  # dwMicroSecPerFrame ... dwWidth at +32, dwHeight at +36
    out[avih + 32 : avih + 40] = np.array([width, height], "<u4").tobytes()
    strf = out.index(b"strf") + 8  # BITMAPINFOHEADER: biSize, biWidth, biHeight
    out[strf + 4 : strf + 12] = np.array([width, height], "<i4").tobytes()
    return bytes(out)


def write(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


def _mux_silence(out: av.container.OutputContainer, stream, seconds: float) -> None:
    samples, chunk = int(seconds * stream.rate), 1024
    for start in range(0, samples, chunk):
        n = min(chunk, samples - start)
        fmt = stream.codec_context.format.name  # s16 for pcm, fltp for aac
        dtype = np.int16 if fmt == "s16" else np.float32
        frame = av.AudioFrame.from_ndarray(np.zeros((1, n), dtype), format=fmt, layout="mono")
        frame.sample_rate, frame.pts = stream.rate, start
        out.mux(stream.encode(frame))
    out.mux(stream.encode())


def bogus_sample_size(data: bytes, sample: int = 4, size: int = 0x660000) -> bytes:
    """An mp4/mov whose sample table gives one frame `size` bytes, far past the end of the file."""
    out = bytearray(data)
    entries = out.index(b"stsz") + 16  # after type, version+flags, sample_size, sample_count
    out[entries + 4 * sample : entries + 4 * sample + 4] = size.to_bytes(4, "big")
    return bytes(out)


def encode_timed(frames: list[tuple[float, tuple[int, int, int]]], fmt: str = "mkv_h264",
                 width: int = WIDTH, height: int = HEIGHT) -> bytes:
    """A variable-frame-rate video: one solid-colour frame per (presentation time in seconds,
    RGB colour), timestamps in milliseconds. The last frame is shown for 1 s."""
    container_fmt, codec, pix_fmt, suffix = FORMATS[fmt]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"vfr{suffix}"
        with av.open(str(path), "w", format=container_fmt) as out:
            stream = out.add_stream(codec, rate=1000, options=_CODEC_OPTIONS.get(codec, {}))
            stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
            stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
            for t, colour in frames:
                pixels = np.empty((height, width, 3), np.uint8)
                pixels[:] = colour
                frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
                frame.pts, frame.time_base = round(t * 1000), Fraction(1, 1000)
                _mux_ms(out, stream.encode(frame))
            _mux_ms(out, stream.encode())
        return path.read_bytes()


def _mux_ms(out, packets) -> None:
    for packet in packets:     # the encoder's millisecond ticks, rescaled by the muxer
        packet.time_base = Fraction(1, 1000)
        out.mux(packet)


GREEN, RED = (0, 200, 0), (200, 0, 0)


def green_then_red_for_50_minutes(fmt: str = "mkv_h264") -> bytes:
    """300 green frames in the first 0.3 s, then red frames every 10 minutes to 50 minutes:
    by frame count almost all green; by playback 3,000 s of red."""
    return encode_timed([(i / 1000, GREEN) for i in range(300)]
                        + [(0.3 + 600 * k, RED) for k in range(6)], fmt)


def three_frames_over_hours(fmt: str = "mkv_h264") -> bytes:
    """Three frames whose timestamps span 3 h 54 min (14,040 s)."""
    return encode_timed([(0.0, GREEN), (7020.0, RED), (14040.0, RED)], fmt)


def colour_of(frame: np.ndarray) -> str:
    """"green", "red" or "other" for a decoded solid frame."""
    r, g, b = frame.reshape(-1, 3).mean(axis=0)
    return "green" if g > 120 > r else "red" if r > 120 > g else "other"
