"""The runner's KV cache: transformers' DynamicCache with every layer preallocated
(`SlotLayer`), written in place instead of grown by concatenation. Only the layer's `update`,
`get_mask_sizes`, `get_seq_length` and `crop` are what transformers calls (the same on 5.17
and 5.2x); the runner (`guardrail.runner.Batch`) does everything else on the buffers.

Layers hold `keys` / `values` of shape [B, H_kv, T, D], stored after RoPE: a token's entries do
not depend on where it sits in the cache, only on the position ids it was encoded with, so
entries can be reordered, dropped, stitched and reused freely as long as the attention mask
says who sees whom."""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

Tensors = list[tuple[torch.Tensor, torch.Tensor]]   # per layer (keys, values) [B, H, T, D]


def layers(cache: Any) -> Tensors:
    return [(layer.keys, layer.values) for layer in cache.layers]


class Columns:
    """Where the next forward writes its new entries, shared by a cache's `SlotLayer`s and set
    by the runner before each forward: from column `start` in every row, or (rows out of step)
    from `cols` [B, n] (device), one column per new token of each row. `width`: how many
    columns the forward's attention reads."""

    def __init__(self) -> None:
        self.start, self.cols, self.width = 0, None, 0


class SlotLayer(DynamicLayer):
    """One layer's keys and values in buffers allocated once, [B, H, capacity, D]: a forward
    writes its new entries into them in place (a slice copy, or a scatter when rows are out of
    step) and attention reads a view of the first `columns.width` columns. No `torch.cat` per
    step, unlike DynamicLayer (which copies the whole cache at every step); the runner copies
    entries only to prune them (`Batch.keep`), to take a row out (`Batch.row`) or, rarely, to
    grow the buffers."""

    def __init__(self, columns: Columns, capacity: int):
        super().__init__()
        self.columns, self.capacity = columns, capacity

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor,
                            batch: int | None = None) -> None:
        b, h, _, d = key_states.shape
        b = batch or b
        self.device, self.dtype = key_states.device, key_states.dtype
        self.k_buf = key_states.new_zeros(b, h, self.capacity, d)   # zeros: masked columns
        self.v_buf = value_states.new_zeros(b, h, self.capacity, value_states.shape[-1])
        self._view(0)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        c = self.columns
        if c.cols is None:
            n = key_states.shape[-2]
            self.k_buf[:, :, c.start: c.start + n] = key_states
            self.v_buf[:, :, c.start: c.start + n] = value_states
        else:
            where = c.cols[:, None, :, None]
            self.k_buf.scatter_(2, where.expand_as(key_states), key_states)
            self.v_buf.scatter_(2, where.expand_as(value_states), value_states)
        self._view(c.width)
        return self.keys, self.values

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        """(keys the forward's attention reads, 0): the columns the runner set, not the
        cached length + new tokens a growing cache would have (rows out of step write fewer
        columns than that)."""
        return self.columns.width, 0

    def _view(self, width: int) -> None:
        self.keys, self.values = self.k_buf[:, :, :width], self.v_buf[:, :, :width]

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last -`tokens_to_remove` columns from view (a negative count, as 5.2x
        takes it; 5.17's positive "keep n" is refused rather than misread)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass minus the columns to drop")
        if tokens_to_remove < 0 and self.is_initialized:
            self._view(self.keys.shape[-2] + tokens_to_remove)

    def grow(self, capacity: int) -> None:
        """Bigger buffers (entries kept); only when a plan outgrew the capacity it was given."""
        self.capacity = capacity
        if self.is_initialized:
            width = self.keys.shape[-2]
            k, v = self.k_buf, self.v_buf
            self.k_buf = k.new_zeros(*k.shape[:2], capacity, k.shape[-1])
            self.v_buf = v.new_zeros(*v.shape[:2], capacity, v.shape[-1])
            self.k_buf[:, :, : k.shape[2]] = k
            self.v_buf[:, :, : v.shape[2]] = v
            self._view(width)


def preallocated(cache: Any, columns: Columns, capacity: int) -> Any:
    """`cache` (a fresh DynamicCache) with every layer a `SlotLayer` of `capacity` columns."""
    kinds = {type(layer) for layer in cache.layers}
    if kinds - {DynamicLayer}:
        raise NotImplementedError(f"no preallocated form of cache layers {sorted(map(str, kinds))}"
                                  " (sliding-window and other special layers)")
    cache.layers = [SlotLayer(columns, capacity) for _ in cache.layers]
    return cache
