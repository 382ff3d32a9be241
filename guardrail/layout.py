"""Where every prompt token sits and what it may attend to. Pure tensor math.

A prompt is a list of *groups*; a group is one or more *segments* (runs of tokens). Segments of
one group are parallel siblings: they all start at the same position and cannot see each other
(PEPE). Groups follow each other: a group starts at the position after the longest segment of
the group before it, and sees every earlier group in full. Inside a segment attention is causal.

    sequential       [S] [V] [P1] [P2] ... [Q] [R1 R2 ...]
    parallel         [S] [V] [P1 P2 ...] [Q] [R1 R2 ...]
    parallel_cached  [S] [P1 P2 ...] [V] [Q] [R1 R2 ...]
    isolated         [S] [V] [P1 Q1 R1 | P2 Q2 R2 | ...]

(R_i are the verdict probes, parallel in every layout. Under `isolated` each category's branch,
its chunk, its own question and its probe, is one segment named `R<i>` of the last group.)
Positions come in `rows` rows: 3 for mRoPE (temporal, height, width; text rows are equal), 1 for
ordinary RoPE. A segment carries its own positions relative to its start (a video keeps its 3-D
grid ids) and how far it advances the position counter (`advance`, which for a video is what the
family's reference position formula says).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from guardrail.errors import UsageError
from guardrail.prompt import LAYOUTS  # noqa: F401 - the layout names, also imported from here

HOST = torch.device("cpu")   # layouts are planned on the host; the runner moves them once


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
    ids = torch.as_tensor(ids, dtype=torch.long, device=HOST).reshape(-1)
    rel = torch.arange(ids.numel(), dtype=torch.long, device=HOST).expand(rows, -1).clone()
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
    solo: torch.Tensor         # [T] bool: the token's group has one segment (nothing parallel)
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
            group_of.append(torch.full((seg.length,), g, dtype=torch.long, device=HOST))
            segment_of.append(torch.full((seg.length,), len(segments), dtype=torch.long,
                                         device=HOST))
            segments.append(seg)
            offset += seg.length
        group_idx.append(tuple(members))
        pos += max(seg.advance for seg in group)
    return Layout(
        segments=tuple(segments),
        positions=torch.cat(positions, dim=1),
        group_of=torch.cat(group_of),
        segment_of=torch.cat(segment_of),
        solo=torch.cat([torch.full((sum(segments[i].length for i in members),), len(members) == 1,
                                   dtype=torch.bool, device=HOST) for members in group_idx]),
        starts=tuple(starts),
        groups=tuple(group_idx),
        next_position=pos,
    )


def build_groups(layout: str, ordered: list[tuple[str, Segment]], probes: list[Segment]
                 ) -> list[list[Segment]]:
    """Groups for `layout` from segments in prompt order, each tagged with its kind ("system",
    "video", "chunk", "question", "branch"): under the parallel layouts consecutive chunks form
    one group (PEPE); under `sequential` every segment is a group. The probes are always one
    group; under `isolated` each probe ends its category's branch (P_i Q_i) in that group."""
    if layout not in LAYOUTS:
        raise UsageError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout == "isolated":
        branches = [seg for kind, seg in ordered if kind == "branch"]
        pairs = enumerate(zip(branches, probes, strict=True))
        return [*([seg] for kind, seg in ordered if kind != "branch"),
                [concat(f"R{i}", b, r) for i, (b, r) in pairs]]
    groups: list[list[Segment]] = []
    previous = None
    for kind, seg in ordered:
        if kind == "chunk" and previous == "chunk" and layout != "sequential":
            groups[-1].append(seg)
        else:
            groups.append([seg])
        previous = kind
    return [*groups, list(probes)]


@dataclass(frozen=True)
class Visibility:
    """Who sees whom in one forward pass, as per-token vectors (on the model's device when the
    runner builds them): each query's and each key's group, segment and layout index, queries
    [B, Q], keys [B, K] in cache order (cached entries, then the new tokens; index -1 marks
    padding). B may be 1 where every row sees alike (the mask broadcasts).

    Rule: key k is visible to query q when k's group comes before q's group, or k is in q's own
    segment at or before q; padding sees and is seen by nothing. Segment ids are global (a
    segment lies in one group), which the packed FlexAttention form relies on. `causal` says
    the step is exactly causal over the cache (no padding, every query in a group of one
    segment), so a backend may use its own causal path and no mask at all."""

    q_group: torch.Tensor
    q_segment: torch.Tensor
    q_index: torch.Tensor
    k_group: torch.Tensor
    k_segment: torch.Tensor
    k_index: torch.Tensor
    causal: bool = False

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.q_index.shape[0], self.q_index.shape[1], self.k_index.shape[1]

    def visible(self, qg, qs, qi, kg, ks, ki) -> torch.Tensor:
        """The rule on broadcastable pieces (used for dense masks and FlexAttention alike)."""
        return (((kg < qg) | ((ks == qs) & (ki <= qi))) & (qi >= 0)) & (ki >= 0)

    def dense(self) -> torch.Tensor:
        """[B, Q, K] bool, on the vectors' device."""
        return self.visible(self.q_group[:, :, None], self.q_segment[:, :, None],
                            self.q_index[:, :, None], self.k_group[:, None, :],
                            self.k_segment[:, None, :], self.k_index[:, None, :])

    def mask_mod(self):
        """A FlexAttention mask_mod over the same vectors (rows must not broadcast). The three
        vectors are packed into one int64 code per token (group, segment, index in 21 bits
        each; -1 for padding): two captured tensors instead of six, which torch's CPU flex
        kernel needs (with six, inductor's C++ code for it does not compile, torch 2.14)."""
        q, k = self._packed(self.q_group, self.q_segment, self.q_index), self._packed(
            self.k_group, self.k_segment, self.k_index)

        def mod(b, h, qi, ki):
            qc, kc = q[b, qi], k[b, ki]
            earlier = (kc >> 42) < (qc >> 42)
            own = ((kc >> 21) == (qc >> 21)) & (kc <= qc)
            return (earlier | own) & (qc >= 0) & (kc >= 0)
        return mod

    @staticmethod
    def _packed(group: torch.Tensor, segment: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        code = (group << 42) | (segment << 21) | index.clamp(min=0)
        return torch.where(index >= 0, code, -1)

    def expand(self, batch: int) -> Visibility:
        """Broadcast rows made explicit ([1, ...] -> [batch, ...])."""
        if self.q_index.shape[0] == batch:
            return self
        e = [t.expand(batch, -1) for t in (self.q_group, self.q_segment, self.q_index,
                                            self.k_group, self.k_segment, self.k_index)]
        return Visibility(*e, causal=self.causal)

    @staticmethod
    def columns(q_column: torch.Tensor, k_column: torch.Tensor, causal: bool = False
                ) -> Visibility:
        """Rows each causal over their own cache columns: query (b, j) sees the keys at columns
        up to its own. `q_column` [B, Q] and `k_column` [B, K] are columns (-1: padding)."""
        zq, zk = torch.zeros_like(q_column), torch.zeros_like(k_column)
        return Visibility(zq, zq, q_column, zk, zk, k_column, causal=causal)

    @staticmethod
    def causal_step(new: int, past: int, device: torch.device | str) -> Visibility:
        """`new` tokens of one causal segment after `past` cached ones (batch 1)."""
        keys = torch.arange(past + new, device=device)[None]
        zeros = torch.zeros_like(keys)
        return Visibility(zeros[:, past:], zeros[:, past:], keys[:, past:], zeros, zeros, keys,
                          causal=True)


def visibility(layout: Layout, q_index: torch.Tensor, k_index: torch.Tensor) -> torch.Tensor:
    """Which keys each query may attend to (the rule of `Visibility`), for one row on the
    layout's device. `q_index` [Q] and `k_index` [K] are token indices into `layout`, -1 for
    padding. Returns [Q, K] bool."""
    q, k = q_index.clamp(min=0), k_index.clamp(min=0)
    return Visibility(layout.group_of[q][None], layout.segment_of[q][None], q_index[None],
                      layout.group_of[k][None], layout.segment_of[k][None],
                      k_index[None]).dense()[0]


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[Q, K] or [B, Q, K] bool -> [B or 1, 1, Q, K] additive float mask (0 allowed, finfo.min
    blocked), on `visible`'s device. NOTE: never a bool mask: under eager attention transformers
    runs it and gives wrong logits. finfo.min rather than -inf keeps fully masked (padding) rows
    finite."""
    zero = torch.zeros((), dtype=dtype, device=visible.device)
    mask = torch.where(visible, zero, torch.finfo(dtype).min)
    while mask.dim() < 4:
        mask = mask.unsqueeze(-3)
    return mask
