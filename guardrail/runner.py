"""Forward passes over a batch of planned windows, one KV cache for all of them.

Each batch row is one window with its own `Layout`. The cache holds, per row, a list of *slots*:
the token index each cache entry belongs to, or -1 for padding. New tokens are appended with
`step` (layout tokens) or `extend` (answer tokens after the prompt), dropped with `keep`.

Everything a step needs lives on the model's device from the start: per-token tables
(ids, positions, group, segment, visual feature row) for every row, and the slots. A step sends
the host's plan, the token indices [B, n], in one copy; ids, positions, embeddings and the
attention visibility (`layout.Visibility`, per-token vectors from which the backend builds its
mask) are gathered there. Whether a step is plainly causal comes from the layouts, not from
comparing a mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from guardrail.adapters.base import ModelAdapter, VisualFeatures
from guardrail.kvcache import Columns, Tensors, layers, preallocated
from guardrail.layout import HOST, Layout, Visibility, additive_mask


@dataclass(frozen=True)
class Item:
    """One window, planned: its layout and its visual features."""

    layout: Layout
    visual: torch.Tensor        # [T] bool: token takes a visual embedding
    feats: VisualFeatures       # rows in the order of the visual tokens

    @property
    def feat_row(self) -> torch.Tensor:  # [T] int64: row of `feats` per token, -1 for text
        return torch.where(self.visual, self.visual.long().cumsum(0) - 1, -1)

    @property
    def probe_start(self) -> int:
        return self.layout.group_span(len(self.layout.groups) - 1).start


def pad_rows(rows: list[torch.Tensor], fill: int = -1) -> torch.Tensor:
    """Ragged 1-D int tensors -> [B, max_len] on the host, right-padded with `fill`."""
    width = max(int(r.numel()) for r in rows)
    out = torch.full((len(rows), width), fill, dtype=torch.long, device=HOST)
    for b, r in enumerate(rows):
        out[b, : r.numel()] = r
    return out


class _Tables:
    """Per-token tables of every row, [B, W] on the device (W = longest layout + `room` answer
    tokens). Answer tokens get the group after every layout group and a segment of their own,
    so they see the whole remaining cache and each other causally."""

    def __init__(self, items: list[Item], device: torch.device, room: int):
        rows = items[0].layout.positions.shape[0]
        width = max(it.layout.length for it in items) + room
        b = len(items)
        ids = torch.zeros(b, width, dtype=torch.long, device=HOST)
        pos = torch.zeros(rows, b, width, dtype=torch.long, device=HOST)
        group = torch.zeros(b, width, dtype=torch.long, device=HOST)
        seg = torch.zeros(b, width, dtype=torch.long, device=HOST)
        feat = torch.full((b, width), -1, dtype=torch.long, device=HOST)
        # host copies the plan of a step is checked against without touching the device
        self.solo = torch.ones(b, width, dtype=torch.bool, device=HOST)
        self.visual = torch.zeros(b, width, dtype=torch.bool, device=HOST)
        offset = 0
        for r, it in enumerate(items):
            lay, n = it.layout, it.layout.length
            ids[r, :n], pos[:, r, :n] = lay.ids, lay.positions
            group[r, :n], seg[r, :n], self.solo[r, :n] = lay.group_of, lay.segment_of, lay.solo
            feat[r, :n] = torch.where(it.visual, it.feat_row + offset, -1)
            self.visual[r, :n] = it.visual
            offset += it.feats.embeds.shape[0]
        self.answer_group = max(len(it.layout.groups) for it in items)
        self.answer_segment = max(len(it.layout.segments) for it in items)
        group[:, width - room:] = self.answer_group
        seg[:, width - room:] = self.answer_segment
        self.lengths = [it.layout.length for it in items]           # next free column per row
        self.room_start = width - room
        self.width = width
        to = dict(device=device, non_blocking=True)
        self.ids, self.pos, self.group, self.seg, self.feat = (
            t.to(**to) for t in (ids, pos, group, seg, feat))
        self.alike = all(it.layout is items[0].layout or (
            torch.equal(it.layout.group_of, items[0].layout.group_of)
            and torch.equal(it.layout.segment_of, items[0].layout.segment_of)) for it in items)


class Batch:
    """A KV cache for several windows plus the slot map that says what each entry is.

    The cache is allocated once per batch (`kvcache.SlotLayer`, room for every row's layout and
    `room` answer tokens) and each row's entries are kept together from column 0: row b holds
    `lengths[b]` entries, and a step writes row b's new tokens right after them. Rows in step
    (equal lengths) write one slice; rows out of step write a scatter (a row's padding tokens
    into one spare column past the capacity, so they never need room), and attention sees the
    columns past a row's end as padding."""

    def __init__(self, adapter: ModelAdapter, items: list[Item], room: int = 0):
        self.adapter = adapter
        self.items = items
        self.device = adapter.device
        self._tables = _Tables(items, self.device, room)
        self._columns = Columns()
        self.capacity = self._tables.width
        self.cache = preallocated(adapter.new_cache(), self._columns, self.capacity + 1)
        self.lengths = [0] * len(items)                      # cache entries per row
        self.slots = torch.empty(len(items), 0, dtype=torch.long, device=HOST)  # [B, K] host
        self._keys = torch.full((len(items), self.capacity + 1), -1, dtype=torch.long,
                                device=self.device)          # [B, capacity + 1] slot per column
        self.grown = 0                                       # times the buffers had to grow
        feats = [it.feats for it in items]
        self._embeds = torch.cat([f.embeds for f in feats]).to(self.device)  # [sum Nv, D]
        self._deepstack = tuple(torch.cat(layer).to(self.device)
                                for layer in zip(*(f.deepstack for f in feats), strict=True))
        self._next_pos = [0] * len(items)                    # answer positions, set by `answer`

    def step(self, new: list[torch.Tensor], capture=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Append tokens `new[b]` (indices into row b's tables: layout tokens, or answer tokens
        written by `extend`) and run them. Returns hidden [B, n, D] and the padded indices
        [B, n] (host). `capture`, if given, is `(layer, fn)` with fn(query, key, mask, scaling,
        keys) called at that layer (see adapters.attention), with mask [B, n, K] additive
        fp32 and keys [B, K] the slot of every key column (host, -1 for padding)."""
        t = self._tables
        idx = pad_rows(new)                                              # [B, n] host
        n = idx.shape[1]
        starts = torch.tensor(self.lengths, dtype=torch.long, device=HOST)
        counts = (idx >= 0).sum(1)
        in_step = bool((starts == starts[0]).all())
        self._reserve(int((starts + counts).max()))
        # row b's tokens go after its entries; its padding to the spare column
        cols = torch.where(idx >= 0, starts[:, None] + torch.arange(n, device=HOST),
                           self.capacity)                                # [B, n] host
        if in_step:
            q = idx.to(self.device, non_blocking=True)                   # the step's one copy
            self._keys[:, self.lengths[0]: self.lengths[0] + n] = q
            self._columns.cols = dcols = None
        else:
            q, dcols = torch.stack([idx, cols]).to(self.device, non_blocking=True)
            self._keys.scatter_(1, dcols, q)
            self._columns.cols = dcols
        self.lengths = (starts + counts).tolist()
        width = max(self.lengths)                  # columns the step's attention reads
        keys = torch.full((len(new), width + 1), -1, dtype=torch.long, device=HOST)
        keys[:, : self.slots.shape[1]] = self.slots
        keys.scatter_(1, cols.clamp(max=width), idx)                     # padding: column K
        keys = keys[:, :width]                                           # [B, K] host
        self._columns.start, self._columns.width = int(starts[0]), width
        k = self._keys[:, :width]
        padded = bool((keys < 0).any())
        qc = q.clamp(min=0)
        ids = t.ids.gather(1, qc)                                        # [B, n]
        positions = t.pos.gather(2, qc.expand(t.pos.shape[0], -1, -1))   # [rows, B, n]
        feat = torch.where(q >= 0, t.feat.gather(1, qc), -1)             # [B, n]
        visual = feat >= 0
        embeds = self.adapter.embed(ids)                                 # [B, n, D]
        deepstack = ()
        if bool((t.visual.gather(1, idx.clamp(min=0)) & (idx >= 0)).any()):   # host check
            picked = self._embeds[feat.clamp(min=0)].to(embeds.dtype)    # [B, n, D]
            embeds = torch.where(visual[..., None], picked, embeds)
            if self._deepstack:
                rows = feat[visual]                   # NOTE: data-dependent; prefill steps only
                deepstack = tuple(d[rows] for d in self._deepstack)
        # every row sees alike (equal-size videos against one policy set): one broadcast row
        alike = t.alike and not padded and all(torch.equal(idx[b], idx[0])
                                               and torch.equal(keys[b], keys[0])
                                               for b in range(1, len(new)))
        if bool(t.solo.gather(1, idx.clamp(min=0)).all()):
            # every new token sees all of its row before it (sequential prompts, answers): the
            # columns say it all; exactly causal (no mask at all) when rows started in step and
            # end in step
            at = dcols if not in_step else torch.arange(
                int(starts[0]), int(starts[0]) + n, device=self.device).expand(len(new), -1)
            vis = self._own_columns(q, at, k, causal=in_step and not padded)
        else:
            vis = self._visibility(q[:1] if alike else q, k[:1] if alike else k)
        if capture is None:
            hidden = self.adapter.forward(embeds, positions, vis, self.cache, visual, deepstack)
        else:
            layer, fn = capture
            mask = additive_mask(vis.dense(), torch.float32)[:, 0].expand(len(new), -1, -1)
            with self.adapter.capture.capture(layer, lambda qq, kk, s: fn(qq, kk, mask, s, keys)):
                hidden = self.adapter.forward(embeds, positions, vis, self.cache, visual,
                                              deepstack)
        self.slots = keys
        return hidden, idx

    def _own_columns(self, q: torch.Tensor, at: torch.Tensor, k: torch.Tensor, causal: bool
                     ) -> Visibility:
        """Visibility of a step whose every query sees all of its row's entries up to its own:
        query (b, j) (layout index q [B, n], -1 padding) written at column at[b, j] sees the real
        keys (k [B, K] layout indices, -1 padding) in columns up to it. From the columns alone: no
        table lookups, and the same matrix as the layout's rule for such steps."""
        cols = torch.arange(k.shape[1], device=k.device).expand_as(k)
        return Visibility.columns(torch.where(q >= 0, at, -1), torch.where(k >= 0, cols, -1),
                                  causal)

    def _visibility(self, q: torch.Tensor, k: torch.Tensor) -> Visibility:
        """The layout's rule for queries `q` [B, n] over keys `k` [B, K] (layout indices)."""
        t = self._tables
        qc, kc = q.clamp(min=0), k.clamp(min=0)
        return Visibility(t.group.gather(1, qc), t.seg.gather(1, qc), q,
                          t.group.gather(1, kc), t.seg.gather(1, kc), k)

    def answer(self, next_positions: list[int]) -> None:
        """Start answer tokens: row b's first one sits at position `next_positions[b]`."""
        self._next_pos = list(next_positions)

    def extend(self, new: list[list[int]]) -> torch.Tensor:
        """Append answer token ids `new[b]` to row b (an empty list: the row waits) and run
        them. Returns hidden [B, D] at each row's last new token (undefined for waiting rows)."""
        t = self._tables
        cols = []
        for b, ids in enumerate(new):
            start = max(t.lengths[b], t.room_start)
            assert start + len(ids) <= t.width, "answer longer than the room the batch was given"
            cols.append(torch.arange(start, start + len(ids), dtype=torch.long, device=HOST))
            t.lengths[b] = start + len(ids)
        idx = pad_rows(cols)                                              # [B, n]
        real = idx >= 0
        # write ids and positions of the new answer tokens into the device tables (one copy)
        flat_b = real.nonzero()[:, 0]
        ids = torch.tensor([i for row in new for i in row], dtype=torch.long, device=HOST)
        pos = torch.cat([torch.arange(len(row), dtype=torch.long, device=HOST)
                         + self._next_pos[b] for b, row in enumerate(new)])
        for b, row in enumerate(new):
            self._next_pos[b] += len(row)
        where = idx[real]
        packed = torch.stack([flat_b, where, ids, pos]).to(self.device, non_blocking=True)
        bi, ci, iv, pv = packed
        t.ids[bi, ci] = iv
        t.pos[:, bi, ci] = pv
        hidden, _ = self.step(list(cols))
        last = (real.sum(1) - 1).clamp(min=0).to(self.device)             # [B]
        return hidden[torch.arange(len(new), device=self.device), last]

    def keep(self, keep: list[torch.Tensor]) -> None:
        """Keep only cache entries whose slot index (per row, positions into the slot list) is in
        `keep[b]` (ascending); each row's kept entries move to its first columns."""
        pos = pad_rows(keep, fill=0)                                     # [B, K'] host
        real = pad_rows(keep) >= 0
        self.slots = torch.where(real, self.slots.gather(1, pos), -1)
        self.lengths = real.sum(1).tolist()
        width = max(self.lengths)
        dev = pos.to(self.device)
        with torch.inference_mode():
            for layer in self.cache.layers:
                for buf, now in ((layer.k_buf, layer.keys), (layer.v_buf, layer.values)):
                    where = dev[:, None, :, None].expand(-1, now.shape[1], -1, now.shape[-1])
                    buf[:, :, :width] = now.gather(2, where)
                layer._view(width)
        self._sync_keys()

    def truncate(self, lengths: list[int]) -> None:
        """Drop every row's entries after its first `lengths[b]` (see `lengths`)."""
        self.lengths = list(lengths)
        width = max(self.lengths)
        cols = torch.arange(self.slots.shape[1], device=HOST)
        ends = torch.tensor(lengths, device=HOST)[:, None]
        self.slots = torch.where(cols < ends, self.slots, -1)[:, :width]
        for layer in self.cache.layers:
            layer.crop(width - layer.keys.shape[-2])
        self._sync_keys()

    def _sync_keys(self) -> None:
        """The device's slot per column from the host's (after a change that is not a step)."""
        self._keys.fill_(-1)
        self._keys[:, : self.slots.shape[1]] = self.slots.to(self.device, non_blocking=True)

    def _reserve(self, columns: int) -> None:
        """Room for `columns` columns; grows the buffers (rare: a plan longer than the room the
        batch was made with) by at least a quarter."""
        if columns <= self.capacity:
            return
        self.capacity = max(columns, self.capacity + self.capacity // 4)
        with torch.inference_mode():
            for layer in self.cache.layers:
                layer.grow(self.capacity + 1)                            # + the spare column
        keys = torch.full((len(self.items), self.capacity + 1), -1, dtype=torch.long,
                          device=self.device)
        keys[:, : self._keys.shape[1]] = self._keys
        self._keys = keys
        self.grown += 1

    def load(self, slots: torch.Tensor, rows: list[Tensors]) -> None:
        """Fill an empty batch with cached entries: `rows` one list of per-layer (keys, values)
        [1, H, K_b, D] per batch row, or a single one every row starts with; `slots` [B or 1, K]
        their slots (host; each row's entries first, then -1)."""
        assert not any(self.lengths), "load() needs an empty batch"
        self.slots = slots.to(HOST).expand(len(self.items), -1).clone()
        self.lengths = (self.slots >= 0).sum(1).tolist()
        width = self.slots.shape[1]
        self._reserve(width)
        targets = [slice(None)] if len(rows) == 1 else [slice(b, b + 1) for b in range(len(rows))]
        with torch.inference_mode():
            for li, layer in enumerate(self.cache.layers):
                for at, tensors in zip(targets, rows, strict=True):
                    k, v = tensors[li]
                    if not layer.is_initialized:
                        layer.lazy_initialization(k, v, batch=len(self.items))
                    layer.k_buf[at, :, : k.shape[2]] = k
                    layer.v_buf[at, :, : v.shape[2]] = v
                layer._view(width)
        self._sync_keys()

    def row(self, b: int) -> tuple[Tensors, torch.Tensor]:
        """Row b alone, copied out of the batch: (per layer (keys, values) [1, H, K_b, D], its
        slots [1, K_b])."""
        n = self.lengths[b]
        tensors = [(k[b: b + 1, :, :n].clone(), v[b: b + 1, :, :n].clone())
                   for k, v in layers(self.cache)]
        return tensors, self.slots[b: b + 1, :n]


def batch_from_prefix(adapter: ModelAdapter, items: list[Item], tensors: Tensors, length: int
                      ) -> Batch:
    """A batch whose every row starts with the same cached prefix (layout tokens 0..length-1)."""
    batch = Batch(adapter, items)
    batch.load(torch.arange(length, device=HOST)[None], [tensors])
    return batch


def batch_from_rows(adapter: ModelAdapter, rows: list[tuple[Item, Tensors, torch.Tensor]],
                    room: int) -> Batch:
    """One batch from rows of earlier batches (item, tensors, slots [1, K_b], as `Batch.row`
    gives them), with `room` answer tokens per row."""
    batch = Batch(adapter, [item for item, _, _ in rows], room=room)
    batch.load(pad_rows([s[0] for _, _, s in rows]), [tensors for _, tensors, _ in rows])
    return batch
