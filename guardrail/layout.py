"""Where every prompt token sits and what it may attend to (SPEC §4.1). Pure tensor math.

A prompt is a list of *groups*; a group is one or more *segments* (runs of tokens). Segments of
one group are parallel siblings: they all start at the same position and cannot see each other
(PEPE). Groups follow each other: a group starts at the position after the longest segment of
the group before it, and sees every earlier group in full. Inside a segment attention is causal.

    sequential       [S] [V] [P1] [P2] ... [Q] [R1 R2 ...]
    parallel         [S] [V] [P1 P2 ...] [Q] [R1 R2 ...]
    parallel_cached  [S] [P1 P2 ...] [V] [Q] [R1 R2 ...]

(R_i are the verdict probes, parallel in every layout.) Positions come in `rows` rows: 3 for
mRoPE (temporal, height, width; text rows are equal), 1 for ordinary RoPE. A segment carries its
own positions relative to its start (a video keeps its 3-D grid ids) and how far it advances the
position counter (`advance`, which for a video is what the model's rope index says).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from guardrail.errors import UsageError

LAYOUTS = ("sequential", "parallel", "parallel_cached")


@dataclass(frozen=True)
class Segment:
    name: str                  # "S", "V", "P<i>", "Q", "R<i>", "A" (answer)
    ids: torch.Tensor          # [L] int64 token ids
    rel_pos: torch.Tensor      # [rows, L] int64 positions relative to the segment's start
    advance: int               # how far the position counter moves after this segment

    @property
    def length(self) -> int:
        return int(self.ids.numel())


def text_segment(name: str, ids: list[int] | torch.Tensor, rows: int) -> Segment:
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    rel = torch.arange(ids.numel(), dtype=torch.long).expand(rows, -1).clone()
    return Segment(name, ids, rel, int(ids.numel()))


def concat(name: str, *parts: Segment) -> Segment:
    """One segment made of consecutive parts (e.g. text, video, text): each part starts where the
    previous one's advance ends."""
    rel, offset = [], 0
    for part in parts:
        rel.append(part.rel_pos + offset)
        offset += part.advance
    return Segment(name, torch.cat([p.ids for p in parts]), torch.cat(rel, dim=1), offset)


@dataclass(frozen=True)
class Layout:
    """A planned prompt. Token order is groups in order, segments of a group in order."""

    segments: tuple[Segment, ...]
    positions: torch.Tensor    # [rows, T] int64 absolute position ids
    group_of: torch.Tensor     # [T] int64 group index of each token
    segment_of: torch.Tensor   # [T] int64 segment index of each token
    starts: tuple[int, ...]    # token offset of each segment
    groups: tuple[tuple[int, ...], ...]  # segment indices per group
    next_position: int         # first position after the last group

    @property
    def length(self) -> int:
        return int(self.group_of.numel())

    @property
    def ids(self) -> torch.Tensor:  # [T]
        return torch.cat([s.ids for s in self.segments])

    def span(self, name: str) -> slice:
        i = self.index(name)
        return slice(self.starts[i], self.starts[i] + self.segments[i].length)

    def index(self, name: str) -> int:
        for i, s in enumerate(self.segments):
            if s.name == name:
                return i
        raise KeyError(name)

    def group_span(self, g: int) -> slice:
        first, last = self.groups[g][0], self.groups[g][-1]
        return slice(self.starts[first], self.starts[last] + self.segments[last].length)


def plan(groups: list[list[Segment]], start: int = 0) -> Layout:
    """Lay out `groups` from position `start`. Empty segments are allowed and take no tokens."""
    assert groups and all(groups), "every group needs at least one segment"
    rows = groups[0][0].rel_pos.shape[0]
    segments, positions, group_of, segment_of, starts, group_idx = [], [], [], [], [], []
    pos, offset = start, 0
    for g, group in enumerate(groups):
        members = []
        for seg in group:
            assert seg.rel_pos.shape == (rows, seg.length), f"{seg.name}: bad rel_pos shape"
            members.append(len(segments))
            starts.append(offset)
            positions.append(seg.rel_pos + pos)
            group_of.append(torch.full((seg.length,), g, dtype=torch.long))
            segment_of.append(torch.full((seg.length,), len(segments), dtype=torch.long))
            segments.append(seg)
            offset += seg.length
        group_idx.append(tuple(members))
        pos += max(seg.advance for seg in group)
    return Layout(
        segments=tuple(segments),
        positions=torch.cat(positions, dim=1),
        group_of=torch.cat(group_of),
        segment_of=torch.cat(segment_of),
        starts=tuple(starts),
        groups=tuple(group_idx),
        next_position=pos,
    )


def build_groups(layout: str, ordered: list[tuple[str, Segment]], probes: list[Segment]
                 ) -> list[list[Segment]]:
    """Groups for `layout` from segments in prompt order, each tagged with its kind ("system",
    "video", "chunk", "question"): under the parallel layouts consecutive chunks form one group
    (PEPE); under `sequential` every segment is a group. The probes are always one group."""
    if layout not in LAYOUTS:
        raise UsageError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    groups: list[list[Segment]] = []
    previous = None
    for kind, seg in ordered:
        if kind == "chunk" and previous == "chunk" and layout != "sequential":
            groups[-1].append(seg)
        else:
            groups.append([seg])
        previous = kind
    return [*groups, list(probes)]


def visibility(layout: Layout, q_index: torch.Tensor, k_index: torch.Tensor) -> torch.Tensor:
    """Which keys each query may attend to. `q_index` [Q] and `k_index` [K] are token indices
    into `layout` (the keys are whatever the KV cache holds plus the new tokens, in cache order,
    so evicted tokens simply do not appear); -1 marks padding, which sees and is seen by
    nothing. Returns [Q, K] bool.

    Rule: key k is visible to query q when k's group comes before q's group, or k is in q's own
    segment at or before q."""
    q, k = q_index.clamp(min=0), k_index.clamp(min=0)
    gq, gk = layout.group_of[q], layout.group_of[k]
    sq, sk = layout.segment_of[q], layout.segment_of[k]
    earlier_group = gk[None, :] < gq[:, None]
    same_segment_causal = (sk[None, :] == sq[:, None]) & (k[None, :] <= q[:, None])
    real = (q_index >= 0)[:, None] & (k_index >= 0)[None, :]
    return (earlier_group | same_segment_causal) & real


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[Q, K] or [B, Q, K] bool -> [B or 1, 1, Q, K] additive float mask (0 allowed, finfo.min
    blocked). NOTE: never a bool mask: under eager attention transformers runs it and gives wrong
    logits. finfo.min rather than -inf keeps fully masked (padding) rows finite."""
    mask = torch.zeros(visible.shape, dtype=dtype)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    while mask.dim() < 4:
        mask = mask.unsqueeze(-3)
    return mask
