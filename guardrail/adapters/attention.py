"""A look at one decoder layer's attention during a forward pass, for pruning (SPEC §4.3).

The language model's attention implementation is swapped, once, for a thin wrapper around the
backend it was loaded with (sdpa, eager or flex). The wrapper passes everything through; while a
`capture(layer, fn)` block is active it also calls `fn(query, key, mask, scaling)` for that
layer, with the post-RoPE query and the full key of the forward (cache + new tokens), so the
caller can compute the few attention rows it needs without materialising attention for the
whole model.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

CaptureFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], None]
_names = itertools.count()


class AttentionCapture:
    """Installs the pass-through wrapper on `language_model` (a transformers decoder)."""

    def __init__(self, language_model: Any):
        config = language_model.config
        backend = config._attn_implementation
        first = language_model.layers[0].self_attn
        if backend == "eager":
            base = sys.modules[type(first).__module__].eager_attention_forward
        else:
            base = ALL_ATTENTION_FUNCTIONS[backend]
        self._layers = [layer.self_attn for layer in language_model.layers]
        self._active: tuple[Any, CaptureFn] | None = None

        def attention(module, query, key, value, attention_mask, **kwargs):
            if self._active is not None and module is self._active[0]:
                scaling = kwargs.get("scaling") or module.scaling
                self._active[1](query, key, attention_mask, float(scaling))
            return base(module, query, key, value, attention_mask, **kwargs)

        # NOTE: registered names are global in transformers; one per adapter instance.
        name = f"guardrail_{backend}_{next(_names)}"
        AttentionInterface.register(name, attention)
        config._attn_implementation = name
        self.backend = backend

    @property
    def num_layers(self) -> int:
        return len(self._layers)

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
    """Softmaxed attention of query rows `rows` of ONE batch row. query [H, n, d], key
    [H_kv, K, d], mask [n, K] additive. Returns [H, r, K] fp32."""
    h, h_kv = query.shape[0], key.shape[0]
    k = key.repeat_interleave(h // h_kv, dim=0).float()                 # [H, K, d]
    scores = query[:, rows].float() @ k.transpose(1, 2) * scaling       # [H, r, K]
    return (scores + mask[rows].float()).softmax(dim=-1)
