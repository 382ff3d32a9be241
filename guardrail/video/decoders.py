"""Frame decoders: the `FrameDecoder` protocol, `DecordDecoder` (decord in a forked child
process), `PyAVDecoder`, and the `DECODERS` registry that `load_video` picks from. Each returns
the frames at given indices of an input PyAV has already validated."""

from __future__ import annotations

import faulthandler
import importlib.util
import multiprocessing
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from contextlib import suppress
from multiprocessing.connection import Connection
from typing import ClassVar, Protocol

import av
import numpy as np

from guardrail.errors import VideoError
from guardrail.video.shots import THUMB, centred, change
from guardrail.video.source import _Deadline, _one_line, _Source
from guardrail.video.timeline import Timeline
from guardrail.video.types import VideoInfo, _require
from guardrail.video.validate import _decode, _open_container, _video_stream


class FrameDecoder(Protocol):
    """Decodes frames of one video, already validated by PyAV, by index (presentation order)."""

    name: ClassVar[str]
    num_frames: int  # frames the decoder indexed in the stream (0: it cannot tell)

    def __init__(self, source: _Source, info: VideoInfo, deadline: _Deadline,
                 timeline: Timeline, size: tuple[int, int] | None = None) -> None:
        """`size`: (width, height) to decode frames to (scaled while decoding); None: the
        video's own size."""
        ...

    @staticmethod
    def available() -> bool: ...

    def read(self, indices: Sequence[int]) -> np.ndarray:
        """Frames [len(indices), H, W, 3] uint8 RGB at the decoder's size; an index past the
        last decodable frame gives the last decodable frame."""
        ...

    def close(self) -> None: ...


class DecordDecoder:
    """decord (the `decord2` build), run in a child process forked for this video.

    NOTE: decord segfaults on some corrupt files that FFmpeg itself decodes (found by fuzzing
    decord2 3.4) and blocks in C++ without a clock. In a child, a crash is a VideoError and a
    hang is killed at the deadline; the engine's process survives both. The child is forked,
    not spawned: a spawned or forkserver child re-imports the caller's `__main__` (torch, the
    CLI, a Ray worker...) for every video, and decord takes 0.6 s to import."""

    name: ClassVar[str] = "decord"

    def __init__(self, source: _Source, info: VideoInfo, deadline: _Deadline,
                 timeline: Timeline, size: tuple[int, int] | None = None) -> None:
        # NOTE: torch before decord: decord loads NVBLAS, which then takes over the CPU BLAS
        # of a torch imported after it ("[NVBLAS] CPU Blas library need to be provided", then
        # a segfault in the first matmul). Commands that never decode (policy ..., --help)
        # import neither. (import_module: an import sorter must not put torch second.)
        importlib.import_module("torch")
        import decord  # noqa: F401 - imported here once, so that forked children have it

        self._deadline = deadline
        ctx = multiprocessing.get_context("fork")
        self._conn, child = ctx.Pipe()
        scaled = size if size is not None and size != (info.width, info.height) else None
        self._worker = ctx.Process(target=_decord_worker,
                                   args=(child, self._conn, source, scaled), daemon=True)
        self._worker.start()
        child.close()
        self.num_frames = self._reply("opening the video")
        if timeline.num_frames and self.num_frames != timeline.num_frames:
            self.close()      # its indices would not be the timeline's frames
            raise VideoError(f"decord counts {self.num_frames} frames, the stream's packets "
                             f"{timeline.num_frames}")

    @staticmethod
    def available() -> bool:
        return importlib.util.find_spec("decord") is not None

    def read(self, indices: Sequence[int]) -> np.ndarray:
        with suppress(OSError):  # a dead worker: _reply says how it died
            self._conn.send(list(indices))
        return self._reply("decoding")

    def close(self) -> None:
        self._conn.close()
        if self._worker.is_alive():
            self._worker.kill()
        self._worker.join()

    def _reply(self, doing: str):
        if not self._conn.poll(self._deadline.left()):
            self.close()
            raise self._deadline.expired(doing)
        try:
            ok, value = self._conn.recv()
        except (EOFError, OSError):
            self.close()
            code = self._worker.exitcode
            raise VideoError(f"decord crashed while {doing} (exit code {code})") from None
        if not ok:
            self.close()  # the child has exited
            raise VideoError(f"decord failed while {doing} ({value})")
        return value


def _decord_worker(conn: Connection, parent_end: Connection, source: _Source,
                   size: tuple[int, int] | None) -> None:
    """Child process: open the video (scaled to `size` while decoding, if given), reply with
    its frame count, then answer each list of indices with frames [N, H, W, 3] until the
    parent hangs up. Replies are (ok, value)."""
    parent_end.close()  # forked copy; closed so that recv() sees EOF when the parent goes
    faulthandler.disable()  # a crash here is expected; the parent reports it
    try:
        import decord

        width, height = size or (-1, -1)
        reader = decord.VideoReader(source.open(), decord.cpu(0), width=width, height=height)
        last = len(reader) - 1
        conn.send((True, len(reader)))
        while True:
            indices = conn.recv()
            conn.send((True, reader.get_batch([min(i, last) for i in indices]).asnumpy()))
    except EOFError:
        return
    except Exception as err:  # noqa: BLE001 - sent to the parent, which raises VideoError
        conn.send((False, _one_line(err)))


class PyAVDecoder:
    """PyAV (FFmpeg): a frame's index is its rank among the stream's packet timestamps (the
    timeline's order, as in decord); jumps seek to the nearest keyframe. Streams without
    timestamps decode sequentially."""

    name: ClassVar[str] = "pyav"

    def __init__(self, source: _Source, info: VideoInfo, deadline: _Deadline,
                 timeline: Timeline, size: tuple[int, int] | None = None) -> None:
        self._source, self._deadline = source, deadline
        self._size = size or (info.width, info.height)
        # [F] sorted packet pts, ranks of keyframes among them, whether packets carry pts at all
        self._timeline = timeline
        self._pts, self._keys = timeline.pts, timeline.keyframes
        self.num_frames = len(self._pts)
        self._container: av.container.InputContainer | None = None
        self._frames: Iterator[av.VideoFrame] = iter(())
        self._pos, self._last = -1, None  # index and frame last decoded

    @staticmethod
    def available() -> bool:
        return True

    def read(self, indices: Sequence[int]) -> np.ndarray:
        width, height = self._size      # kept even if the stream changes size midway
        out = np.empty((len(indices), height, width, 3), np.uint8)   # the only copy held
        rows: dict[int, list[int]] = {}
        for row, i in enumerate(indices):
            rows.setdefault(i, []).append(row)
        for i in sorted(rows):
            self._seek_for(i)
            while self._pos < i and (frame := next(self._frames, None)) is not None:
                self._pos, self._last = self._index_of(frame), frame
            if self._last is None:
                raise VideoError("no decodable video frames")
            out[rows[i]] = self._last.to_ndarray(format="rgb24", width=width, height=height)
        return out

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None

    def _seek_for(self, i: int) -> None:
        """Position the decoder so that decoding on reaches frame i with the least work."""
        if self._container is None or i < self._pos:
            self._restart()
        key = self._keys[bisect_right(self._keys, i) - 1]
        if key <= max(self._pos, 0):
            return  # no keyframe to skip ahead to
        self._container.seek(int(self._pts[key]), stream=self._stream, backward=True)
        self._frames = _decode(self._container, self._stream, self._deadline)
        self._last = None                 # the frame before the seek is no neighbour
        frame = next(self._frames, None)
        if frame is None or self._index_of(frame) > i:  # NOTE: demuxers that seek by dts may
            self._restart()  # overshoot; then decode from the start
        else:
            self._pos, self._last = self._index_of(frame), frame

    def _restart(self) -> None:
        self.close()
        self._container = _open_container(self._source, self._deadline)
        self._stream = _video_stream(self._container)
        self._stream.thread_type = "AUTO"
        self._frames = _decode(self._container, self._stream, self._deadline)
        self._pos, self._last = -1, None

    def _index_of(self, frame: av.VideoFrame) -> int:
        return self._timeline.rank(frame.pts, self._pos,
                                   None if self._last is None else self._last.pts)


def frame_changes(src: _Source, timeline: Timeline, deadline: _Deadline) -> np.ndarray:
    """[F-1] float32: how much each frame (presentation order) changes from the one before
    (`shots.change` on tiny thumbnails), from one sequential decode, streamed: one thumbnail is
    held, not F. A frame that does not decode counts as no change."""
    width, height = THUMB
    changes = np.zeros(max(timeline.num_frames - 1, 0), np.float32)
    container = _open_container(src, deadline)
    previous, pos, last_pts = None, -1, None
    try:
        stream = _video_stream(container)
        stream.thread_type = "AUTO"
        for frame in _decode(container, stream, deadline):
            i, last_pts = timeline.rank(frame.pts, pos, last_pts), frame.pts
            thumb = centred(frame.to_ndarray(format="rgb24", width=width, height=height))
            if previous is not None and 0 < i <= len(changes):
                changes[i - 1] = change(previous, thumb)
            previous, pos = thumb, max(pos, i)
    finally:
        container.close()
    return changes


DECODERS: dict[str, type[FrameDecoder]] = {"decord": DecordDecoder, "pyav": PyAVDecoder}


def _backends(backend: str) -> list[str]:
    """Decoders to try, in order: every installed one for `auto`, else the one named."""
    if backend == "auto":
        return [name for name, cls in DECODERS.items() if cls.available()]
    _require(backend in DECODERS, f"video backend must be auto or one of "
             f"{', '.join(DECODERS)}, not {backend!r}")
    _require(DECODERS[backend].available(), f"video backend {backend!r} is not installed")
    return [backend]
