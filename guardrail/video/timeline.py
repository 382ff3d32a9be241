"""When every frame is shown: one demux pass over the video packets (no decoding) gives each
frame's presentation timestamp, so sampling picks frames by time over the real playback, not
by index over a nominal frame rate (a variable-frame-rate file can hold one frame for an hour).

Frames are in presentation order (sorted timestamps), the order decord and `PyAVDecoder` index
them in. A stream without timestamps is read in decode order at its nominal rate, with a
warning the verdict carries."""

from __future__ import annotations

from dataclasses import dataclass, field

import av
import numpy as np

from guardrail.video.source import _Deadline, _Source
from guardrail.video.validate import _open_container, _video_stream


@dataclass(frozen=True)
class Timeline:
    pts: np.ndarray            # [F] int64 packet timestamps in stream time base, ascending
    times_s: np.ndarray        # [F] float64 seconds from the first frame, ascending
    end_s: float               # when the last frame stops showing: the playback duration
    keyframes: list[int]       # ranks of keyframes among the frames (0 always)
    timed: bool                # False: no timestamps; frames placed at the nominal rate
    warnings: tuple[str, ...] = field(default=())
    shared: bool = False       # some frames share a timestamp (decoders rank them in order)

    @property
    def num_frames(self) -> int:
        return int(self.times_s.size)

    def rank(self, pts: int | None, pos: int, previous_pts: int | None) -> int:
        """Index (presentation order) of a frame decoded with timestamp `pts`, right after the
        frame at index `pos` with timestamp `previous_pts` (pos -1, None: none before)."""
        if not self.timed or pts is None:
            return pos + 1
        if self.shared and previous_pts is not None and pts == previous_pts:
            return pos + 1          # frames sharing a timestamp: ranks in output order
        return int(np.searchsorted(self.pts, pts))


def read_timeline(src: _Source, deadline: _Deadline, fps: float,
                  container_duration_s: float = 0.0) -> Timeline:
    """Presentation times of the video packets of `src` (already validated by PyAV). `fps` is
    the stream's nominal rate, used where timestamps are missing and for the last frame's
    display time when its packet does not say."""
    container = _open_container(src, deadline)
    pts, durations, keys, missing = [], [], [], 0
    try:
        stream = _video_stream(container)
        base = stream.time_base      # a Fraction: times are ticks * num / den, rounded once
        for packet in container.demux(stream):
            deadline.check("indexing the video")
            if packet.size > 0:
                stamp = packet.pts
                if stamp is None:          # a packet without a pts: its dts where it has one
                    stamp, missing = packet.dts, missing + 1
                pts.append(stamp)
                durations.append(packet.duration or 0)
                keys.append(packet.is_keyframe)
    except av.FFmpegError:
        pass  # a truncated file: index the packets read so far
    finally:
        container.close()
    n = len(pts)
    if n == 0:
        return Timeline(np.zeros(0, np.int64), np.zeros(0), 0.0, [0], False)
    if any(p is None for p in pts) or not base:     # NOTE: no time at all for some frames
        times = np.arange(n, dtype=np.float64) / fps
        return Timeline(np.arange(n, dtype=np.int64), times, n / fps, [0], False, (
            f"the video stream carries no timestamps: its {n} frames are placed at the nominal "
            f"{fps:g} fps in decode order",))
    order = np.argsort(pts, kind="stable")
    raw = np.asarray(pts, np.int64)[order]
    ticks = raw - raw[0]
    times = ticks * base.numerator / base.denominator
    # How long the last frame shows. Packet durations can be decode-order gaps (mp4 with
    # B-frames gives the last frame the whole reordering span), so: the container's end where
    # it falls within the last frame's packet duration, else the shortest of that duration and
    # the median frame step.
    seconds = base.numerator / base.denominator
    steps = np.diff(times)
    packet = int(durations[int(order[-1])]) * seconds
    median = float(np.median(steps)) if steps.size else 0.0
    last_t = float(times[-1])
    start = float(raw[0]) * seconds
    container_end = container_duration_s - start if container_duration_s else 0.0
    if last_t < container_end <= last_t + max(packet, median, 1e-3) + 1e-6:
        end = container_end
    else:
        shown = [x for x in (packet, median) if x > 0]
        end = last_t + (min(shown) if shown else 1.0 / fps)
    key_ranks = [0] + [r for r, p in enumerate(order.tolist()) if keys[p] and r > 0]
    warnings: list[str] = []
    if container_end and abs(end - container_end) > max(1.0, 0.1 * end):
        warnings.append(f"the container says {container_end:.1f} s but the frames' timestamps "
                        f"span {end:.1f} s; judged over the timestamps")
    if missing:
        warnings.append(f"{missing} video packets carry no presentation timestamp; they are "
                        "placed by their decoding timestamp")
    repeated = int((np.diff(raw) == 0).sum())
    if repeated:
        warnings.append(f"{repeated} frames share their presentation timestamp with the frame "
                        "before; only the last of each is on screen and judged")
    return Timeline(raw, times, end, key_ranks, True, tuple(warnings), repeated > 0)
