"""The language model's attention backend, chosen once: how a step's `Visibility` (per-token
vectors on the device) becomes the backend's mask, and a look at one layer's attention during a
forward pass (for pruning).

Backends: `sdpa` and `eager` take an additive float mask built on the device from the vectors;
`flex_attention` takes a FlexAttention `BlockMask` whose `mask_mod` reads the same vectors (the
PEPE mask is block-sparse, which flex skips on GPU). Only the language model switches backend:
the vision tower keeps sdpa, since transformers does not offer flex for the Qwen-VL vision
towers.

The language model's attention is swapped for a thin wrapper around the chosen backend. The
wrapper passes everything through; while a `capture(layer, fn)` block is active it also calls
`fn(query, key, scaling)` for that layer, with the post-RoPE query and the full key of the
forward (cache + new tokens), so the caller can compute the few attention rows it needs without
materialising attention for the whole model.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from guardrail.layout import Visibility, additive_mask

CaptureFn = Callable[[torch.Tensor, torch.Tensor, float], None]
_names = itertools.count()


def dense_mask(visible: Visibility, dtype: torch.dtype, batch: int) -> torch.Tensor:
    """[B or 1, 1, Q, K] additive mask in `dtype`, on the vectors' device."""
    return additive_mask(visible.dense(), dtype)


def block_mask(visible: Visibility, dtype: torch.dtype, batch: int) -> Any:
    """FlexAttention BlockMask over the vectors (dtype unused: flex masks are not additive)."""
    from torch.nn.attention.flex_attention import create_block_mask

    vis = visible.expand(batch)                       # block masks do not broadcast rows
    b, q, k = vis.shape
    return create_block_mask(vis.mask_mod(), b, None, q, k, device=vis.q_index.device)


# backend -> how a step's visibility becomes that backend's attention mask
MASKS: dict[str, Callable[[Visibility, torch.dtype, int], Any]] = {
    "sdpa": dense_mask,
    "eager": dense_mask,
    "flex_attention": block_mask,
}


FOLD_ROWS = 64   # masked steps of at most this many tokens per row: `folded_sdpa`


def folded_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: torch.Tensor, scaling: float) -> tuple[torch.Tensor, None]:
    """sdpa over a masked step of few tokens per row under grouped-query attention (decode
    steps of rows out of step with our mask; several answer tokens after a cache with
    transformers' causal mask), without the copy of K/V per query head that transformers makes
    whenever a mask is given (its `repeat_kv`: 7x the cache at Qwen2.5-VL-7B widths, each
    step). The G query heads sharing a key/value head become G x n rows of one query against
    that head, the mask repeated for them (G x n x K, small when n is). query [B, H, n, d],
    key/value [B, H_kv, K, d], mask [B or 1, 1, n, K] (additive or bool). Returns
    ([B, n, H, d], None) as transformers' attention functions do."""
    b, h, n, d = query.shape
    h_kv, k_len = key.shape[1], key.shape[2]
    g = h // h_kv
    q = query.reshape(b, h_kv, g * n, d)                  # head h = kv head h // g, as repeat_kv
    m = mask.expand(b, 1, n, k_len)[:, :, None].expand(b, 1, g, n, k_len).reshape(
        b, 1, g * n, k_len)
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=m,
                                                           scale=scaling)
    return out.reshape(b, h, n, value.shape[-1]).transpose(1, 2).contiguous(), None


class AttentionCapture:
    """Installs the pass-through wrapper on `language_model` (a transformers decoder), around
    `backend` (default: the one the model was loaded with)."""

    def __init__(self, language_model: Any, backend: str | None = None):
        config = language_model.config
        backend = backend or config._attn_implementation
        assert backend in MASKS, f"no mask builder for attention backend {backend!r}"
        self.mask = MASKS[backend]
        first = language_model.layers[0].self_attn
        if backend == "eager":
            base = sys.modules[type(first).__module__].eager_attention_forward
        else:
            base = ALL_ATTENTION_FUNCTIONS[backend]
        self._layers = [layer.self_attn for layer in language_model.layers]
        self._active: tuple[Any, CaptureFn] | None = None
        self.backend = backend

        def attention(module, query, key, value, attention_mask, **kwargs):
            if self._active is not None and module is self._active[0]:
                scaling = kwargs.get("scaling") or module.scaling
                self._active[1](query, key, float(scaling))
            if (backend == "sdpa" and attention_mask is not None
                    and query.shape[1] > key.shape[1] and query.shape[2] <= FOLD_ROWS):
                return folded_sdpa(query, key, value, attention_mask,
                                   kwargs.get("scaling") or module.scaling)
            return base(module, query, key, value, attention_mask, **kwargs)

        # NOTE: registered names are global in transformers; one per adapter instance. The mask
        # interface must be registered under the same name: for an unknown name transformers
        # builds no causal mask, and sdpa's own is_causal is top-left aligned, wrong whenever
        # new tokens follow a cache.
        name = f"guardrail_{backend}_{next(_names)}"
        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[backend])
        config._attn_implementation = name

    @contextmanager
    def capture(self, layer: int, fn: CaptureFn) -> Iterator[None]:
        if not 0 <= layer < len(self._layers):
            from guardrail.errors import UsageError
            raise UsageError(f"pruning layer {layer} out of range (model has "
                             f"{len(self._layers)} layers)")
        self._active = (self._layers[layer], fn)
        try:
            yield
        finally:
            self._active = None


def attention_rows(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor, scaling: float,
                   rows: torch.Tensor) -> torch.Tensor:
    """Softmaxed attention of query rows `rows` of ONE batch row, on the query's device.
    query [H, n, d], key [H_kv, K, d], mask [n, K] additive (any device). Returns [H, r, K]
    fp32."""
    h, h_kv = query.shape[0], key.shape[0]
    k = key.repeat_interleave(h // h_kv, dim=0).float()                 # [H, K, d]
    q = query[:, rows.to(query.device)].float()                          # [H, r, d]
    scores = q @ k.transpose(1, 2) * scaling                              # [H, r, K]
    return (scores + mask[rows.to(mask.device)].to(scores.device, torch.float32)).softmax(dim=-1)
