"""Forward passes over a batch of planned windows, one KV cache for all of them.

Each batch row is one window with its own `Layout`. The cache holds, per row, a list of *slots*:
the layout token index each cache entry belongs to, or -1 for padding. New tokens are appended
with `step`, dropped with `keep`; the attention mask of every step is rebuilt from the layouts
and the slots (`layout.visibility`), so padding, ragged rows, evicted tokens and cached chunks
all come down to which indices sit where.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from guardrail.adapters.base import ModelAdapter, VisualFeatures
from guardrail.kvcache import filled, gather, layers, repeat, truncate
from guardrail.layout import Layout, additive_mask, visibility


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


def _same_row(first: Item, item: Item, idx: torch.Tensor, keys: torch.Tensor, b: int) -> bool:
    """Row b's visibility equals row 0's: same tokens at the same slots, same segments."""
    return (torch.equal(idx[b], idx[0]) and torch.equal(keys[b], keys[0])
            and torch.equal(item.layout.group_of, first.layout.group_of)
            and torch.equal(item.layout.segment_of, first.layout.segment_of))


def pad_rows(rows: list[torch.Tensor], fill: int = -1) -> torch.Tensor:
    """Ragged 1-D int tensors -> [B, max_len], right-padded with `fill`."""
    width = max(int(r.numel()) for r in rows)
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, : r.numel()] = r
    return out


class Batch:
    """A KV cache for several windows plus the slot map that says what each entry is."""

    def __init__(self, adapter: ModelAdapter, items: list[Item], cache: Any = None,
                 slots: torch.Tensor | None = None):
        self.adapter = adapter
        self.items = items
        self.cache = cache if cache is not None else adapter.new_cache()
        self.slots = slots if slots is not None else torch.empty(len(items), 0, dtype=torch.long)

    def step(self, new: list[torch.Tensor], capture=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Append layout tokens `new[b]` to row b and run them. Returns hidden [B, n, D] and the
        padded token indices [B, n]. `capture`, if given, is `(layer, fn)` with
        fn(query, key, mask, scaling, keys) called at that layer (see adapters.attention), with
        mask [B, n, K + n] additive fp32 and keys [B, K + n] the slot of every key."""
        idx = pad_rows(new)                                              # [B, n]
        keys = torch.cat([self.slots, idx], dim=1)                       # [B, K + n]
        ids, pos, masks, vis_rows, deep_rows = [], [], [], [], []
        alike = True                                                     # every row sees as row 0
        for b, item in enumerate(self.items):
            q = idx[b].clamp(min=0)
            ids.append(item.layout.ids[q])
            pos.append(torch.where(idx[b] >= 0, item.layout.positions[:, q], 0))
            same = b > 0 and _same_row(self.items[0], item, idx, keys, b)
            masks.append(masks[0] if same else visibility(item.layout, idx[b], keys[b]))
            alike = alike and (b == 0 or same)
            vis = item.visual[q] & (idx[b] >= 0)
            vis_rows.append(vis)
            deep_rows.append(item.feat_row[q][vis])
        embeds = self.adapter.embed(torch.stack(ids)).clone()            # [B, n, D]
        visual = torch.stack(vis_rows)                                   # [B, n]
        deepstack = ()
        if visual.any():
            rows = [item.feats.select(r) for item, r in zip(self.items, deep_rows, strict=True)]
            embeds[visual.to(embeds.device)] = torch.cat([f.embeds for f in rows]).to(
                embeds.dtype)
            if rows[0].deepstack:
                deepstack = tuple(torch.cat(layer) for layer in zip(*(f.deepstack for f in rows),
                                                                    strict=True))
        # [B, n, K + n], or [1, n, K + n] broadcast when every row sees alike (the common case
        # of equal-size videos against one policy set): one mask instead of B copies
        visible = masks[0][None] if alike else torch.stack(masks)
        positions = torch.stack(pos, dim=1)                              # [rows, B, n]
        if capture is None:
            hidden = self.adapter.forward(embeds, positions, visible, self.cache, visual,
                                          deepstack)
        else:
            layer, fn = capture
            mask = additive_mask(visible, torch.float32)[:, 0].expand(len(self.items), -1, -1)
            with self.adapter.capture.capture(layer, lambda q, k, s: fn(q, k, mask, s, keys)):
                hidden = self.adapter.forward(embeds, positions, visible, self.cache, visual,
                                              deepstack)
        self.slots = keys
        return hidden, idx

    def keep(self, keep: list[torch.Tensor]) -> None:
        """Keep only cache entries whose slot index (per row, positions into the slot list) is in
        `keep[b]`; rows are re-padded to the longest."""
        pos = pad_rows(keep, fill=0)                                     # [B, K']
        real = pad_rows(keep) >= 0
        slots = torch.where(real, self.slots.gather(1, pos), -1)
        self.cache = gather(self.cache, self.adapter.new_cache(), pos)
        self.slots = slots

    def truncate(self, length: int) -> None:
        truncate(self.cache, length)
        self.slots = self.slots[:, :length]

    def row(self, b: int) -> tuple[Any, torch.Tensor]:
        """Row b alone, without padding: (a batch-1 cache, its slots [1, K_b])."""
        real = (self.slots[b] >= 0).nonzero().flatten()
        tensors = [(k[b: b + 1, :, real], v[b: b + 1, :, real]) for k, v in layers(self.cache)]
        return filled(self.adapter.new_cache(), tensors), self.slots[b: b + 1, real]


def batch_from_prefix(adapter: ModelAdapter, items: list[Item], tensors, length: int) -> Batch:
    """A batch whose every row starts with the same cached prefix (layout tokens 0..length-1)."""
    cache = filled(adapter.new_cache(), repeat(tensors, len(items)))
    slots = torch.arange(length).expand(len(items), -1).clone()
    return Batch(adapter, items, cache, slots)
