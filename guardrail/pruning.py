"""Policy-aware visual token pruning (PVTP). Pure tensor math, no model state.

Relevance of video token j to policy i is a number per (i, j); the kept set is the union of
every policy's top-k video tokens, with k chosen so that the union holds ceil(keep_ratio * N)
tokens (see `select_tokens`), in video order. Where relevance comes from depends on the layout
and the variant:

- `kv` (default): attention at one decoder layer during prefill. When the policies follow the
  video (`sequential`, `parallel`), it is the attention policy i's tokens pay to video token j
  (SafeWatch's choice), averaged over heads and over the policy's tokens. Under
  `parallel_cached` the policies come first and cannot see the video, so it is the attention
  video token j pays to policy i's tokens (summed over them, averaged over heads): the share of
  that token's attention that goes to the policy. The dropped tokens are then evicted from every
  layer's KV cache before the verdict probes and decoding.
- `pre_prefill`: before the LLM runs, cosine similarity between each visual embedding and the
  mean input embedding of policy i's tokens. Dropped tokens never enter the model, which saves
  prefill compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from guardrail.errors import UsageError

PRUNING_MODES = ("kv", "pre_prefill")


@dataclass(frozen=True)
class PruningConfig:
    keep_ratio: float = 1.0     # (0, 1]; 1.0 = off
    mode: str = "kv"            # kv | pre_prefill
    layer: int = 2              # decoder layer whose attention scores relevance (kv mode)

    def __post_init__(self):
        if not 0.0 < self.keep_ratio <= 1.0:
            raise UsageError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.mode not in PRUNING_MODES:
            raise UsageError(f"unknown pruning mode {self.mode!r}; choose one of "
                             f"{', '.join(PRUNING_MODES)}")
        if self.layer < 0:
            raise UsageError(f"pruning layer must be >= 0, got {self.layer}")

    @property
    def active(self) -> bool:
        return self.keep_ratio < 1.0


def keep_count(total: int, keep_ratio: float) -> int:
    """Tokens each policy keeps: ceil(ratio * total), at least 1 (when there are any)."""
    return min(total, max(1, math.ceil(keep_ratio * total))) if total else 0


def select_tokens(relevance: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """relevance [m, N] -> kept token indices [K] (ascending), K = keep_count(N, keep_ratio).

    The union of every policy's top-k, with k grown until the union holds K tokens: a token's
    rank is its best rank over the policies, and the K best-ranked tokens are kept (ties: higher
    relevance, then earlier token). Nothing depends on the order of the policies."""
    m, n = relevance.shape
    k = keep_count(n, keep_ratio)
    if k >= n:
        return torch.arange(n, device=relevance.device)
    rel = relevance.float()
    order = torch.sort(rel, dim=1, descending=True, stable=True).indices      # [m, N]
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=order.device).expand(m, -1))   # rank[i, j]
    best_rank = rank.min(dim=0).values                                       # [N]
    top = rel.max(dim=0).values                                              # [N]
    by_score = torch.sort(top, descending=True, stable=True).indices
    by_rank = by_score[torch.sort(best_rank[by_score], stable=True).indices]
    return torch.sort(by_rank[:k]).values
def attention_to_columns(weights: torch.Tensor, row_groups: list[torch.Tensor],
                         cols: torch.Tensor) -> torch.Tensor:
    """Policies' attention to video tokens. weights [H, n, K] softmaxed attention of the forward's
    query rows over its keys; row_groups[i] = query rows of policy i; cols [N] = key columns of
    the video tokens. Returns [m, N]: mean over heads and over each policy's rows."""
    per_token = weights.mean(dim=0)[:, cols]                       # [n, N]
    return torch.stack([per_token[rows].mean(dim=0) for rows in row_groups])


def attention_from_rows(weights: torch.Tensor, rows: torch.Tensor,
                        col_groups: list[torch.Tensor]) -> torch.Tensor:
    """Video tokens' attention to policies. weights [H, n, K]; rows [N] = query rows of the video
    tokens; col_groups[i] = key columns of policy i. Returns [m, N]: for each policy, the mass
    each video token puts on its tokens (mean over heads)."""
    per_token = weights.mean(dim=0)[rows]                          # [N, K]
    return torch.stack([per_token[:, cols].sum(dim=1) for cols in col_groups])


def embedding_similarity(visual: torch.Tensor, policies: list[torch.Tensor]) -> torch.Tensor:
    """visual [N, D] visual embeddings; policies[i] [L_i, D] input embeddings of policy i's
    tokens. Returns [m, N] cosine similarity to each policy's mean embedding."""
    v = torch.nn.functional.normalize(visual.float(), dim=-1)
    p = torch.stack([e.float().mean(dim=0) for e in policies])
    return torch.nn.functional.normalize(p, dim=-1) @ v.T
