"""The Qwen-VL vision towers' attention: one kernel call per vision block for the whole batch.

transformers' Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision attention, under sdpa or eager, splits the
packed patch sequence at `cu_seqlens` and calls attention once per piece: per frame in full
blocks, per 64-patch window in Qwen2.5-VL's windowed blocks (1,808 tiny calls per clip at 7B
size; the GPU idles between them). `install(tower)` replaces that forward on every attention
module of the tower with one that computes the same thing in one call:

- CUDA, half precision: PyTorch's varlen attention (`torch.nn.attention.varlen.varlen_attn`),
  or flash-attn's `flash_attn_varlen_func` when that is installed and PyTorch's is missing;
- anything else (the CPU, fp32): the pieces padded to the longest one, one sdpa call over
  [pieces, heads, longest, head_dim] with a key-padding mask.

Both read the same `cu_seqlens`; a block's pieces are planned once per distinct `cu_seqlens`
tensor (the tower passes the same two tensors, frames and windows, to all its blocks), so the
host reads the lengths once per tower call, not once per block.
"""

from __future__ import annotations

import functools
import sys
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class _Pieces:
    """How a packed sequence splits into pieces, on its device."""

    cu: torch.Tensor            # [P + 1] int32 boundaries
    longest: int
    gather: torch.Tensor        # [P, longest] long: packed index of each padded slot (clamped)
    keys: torch.Tensor          # [P, 1, 1, longest] bool: slot holds a real patch
    real: torch.Tensor          # [S] long: padded slots holding the packed patches, in order


def _plan(cu_seqlens: torch.Tensor, total: int) -> _Pieces:
    dev = cu_seqlens.device
    cu = cu_seqlens.to(torch.int32)
    lengths = (cu[1:] - cu[:-1]).long()                                  # [P]
    longest = int(lengths.max()) if lengths.numel() else 0               # the one host read
    slot = torch.arange(longest, device=dev)                             # [longest]
    valid = slot[None, :] < lengths[:, None]                             # [P, longest]
    gather = (cu[:-1, None].long() + slot[None, :]).clamp(max=max(total - 1, 0))
    real = valid.flatten().nonzero().squeeze(1)                          # [S]
    assert real.numel() == total, f"cu_seqlens cover {real.numel()} of {total} patches"
    return _Pieces(cu, longest, gather, valid[:, None, None, :], real)


class _Planner:
    """Remembers the plan of the last few `cu_seqlens` tensors (by identity) of one tower."""

    def __init__(self) -> None:
        self._plans: list[tuple[torch.Tensor, _Pieces]] = []

    def __call__(self, cu_seqlens: torch.Tensor, total: int) -> _Pieces:
        for tensor, plan in self._plans:
            if tensor is cu_seqlens:
                return plan
        plan = _plan(cu_seqlens, total)
        self._plans = [(cu_seqlens, plan), *self._plans[:1]]     # frames and windows
        return plan


@functools.cache        # looked up once: a failed import is not cached by Python
def _varlen_kernel() -> Any:
    try:
        from torch.nn.attention.varlen import varlen_attn
        return lambda q, k, v, cu, n, scale: varlen_attn(q, k, v, cu, cu, n, n, scale=scale)
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_varlen_func
        return lambda q, k, v, cu, n, scale: flash_attn_varlen_func(
            q, k, v, cu, cu, n, n, softmax_scale=scale)
    except ImportError:
        return None


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pieces: _Pieces,
                     scale: float) -> torch.Tensor:
    """Attention within each piece. q, k, v [S, H, D] -> [S, H, D]."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        kernel = _varlen_kernel()
        if kernel is not None:
            return kernel(q, k, v, pieces.cu, pieces.longest, scale)
    s, h, d = q.shape

    def padded(x):                                                     # -> [P, H, longest, D]
        return x[pieces.gather].transpose(1, 2)

    out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v),
                                         attn_mask=pieces.keys, scale=scale)
    return out.transpose(1, 2).reshape(-1, h, d).index_select(0, pieces.real)


def _forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
             position_embeddings: tuple[torch.Tensor, torch.Tensor], **kwargs: Any) -> torch.Tensor:
    """Drop-in forward of a Qwen-VL vision attention module (same arguments, same result)."""
    s = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(s, 3, self.num_heads, -1).permute(1, 0, 2, 3) \
        .unbind(0)                                                      # each [S, H, D]
    q, k = self._guardrail_rope(q, k, *position_embeddings)
    out = packed_attention(q, k, v, self._guardrail_planner(cu_seqlens, s), self.scaling)
    return self.proj(out.reshape(s, -1))


def install(tower: Any) -> int:
    """Give every Qwen-VL vision attention module of `tower` the one-call forward. Returns how
    many modules were changed (0 for towers of another shape, which keep their own)."""
    planner = _Planner()
    changed = 0
    for module in tower.modules():
        if not type(module).__name__.endswith("VisionAttention"):
            continue
        rope = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb_vision", None)
        if rope is None or not all(hasattr(module, a) for a in ("qkv", "proj", "num_heads",
                                                                  "scaling")):
            continue
        module._guardrail_rope = rope
        module._guardrail_planner = planner
        module.forward = types.MethodType(_forward, module)
        changed += 1
    return changed
