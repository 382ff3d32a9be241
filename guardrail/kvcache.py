"""Operations on transformers' DynamicCache that the engine needs, written against the layer
tensors so they behave the same on transformers 5.17 and 5.2x.

Layers hold `keys` / `values` of shape [B, H_kv, T, D], stored after RoPE: a token's entries do
not depend on where it sits in the cache, only on the position ids it was encoded with, so
entries can be reordered, dropped, stitched and reused freely as long as the attention mask
says who sees whom."""

from __future__ import annotations

from typing import Any

import torch

Tensors = list[tuple[torch.Tensor, torch.Tensor]]   # per layer (keys, values) [B, H, T, D]


def layers(cache: Any) -> Tensors:
    return [(layer.keys, layer.values) for layer in cache.layers]


def filled(cache: Any, tensors: Tensors) -> Any:
    """Fill an empty `cache` with per-layer tensors (through `update`, so every version's
    bookkeeping is right)."""
    assert cache.get_seq_length() == 0, "filled() needs an empty cache"
    for i, (k, v) in enumerate(tensors):
        cache.update(k, v, i)
    return cache


def truncate(cache: Any, length: int) -> None:
    """Drop every cached token after the first `length` (in place)."""
    extra = cache.get_seq_length() - length
    assert extra >= 0, f"cannot truncate a cache of {cache.get_seq_length()} to {length}"
    if extra:
        # NOTE: crop(n > 0) means "keep n" in 5.17 and is an error in 5.24; negative works in both.
        cache.crop(-extra)


def gather(cache: Any, empty: Any, slots: torch.Tensor) -> Any:
    """A new cache holding, for each batch row b, the entries at `slots[b]` ([B, K] int64) of
    `cache`, in that order. `empty` is a fresh cache to fill."""
    out = []
    for k, v in layers(cache):
        idx = slots.to(k.device)[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
        out.append((k.gather(2, idx), v.gather(2, idx)))
    return filled(empty, out)


def repeat(tensors: Tensors, batch: int) -> Tensors:
    """Batch-1 tensors -> `batch` identical rows."""
    return [(k.expand(batch, -1, -1, -1).contiguous(), v.expand(batch, -1, -1, -1).contiguous())
            for k, v in tensors]
