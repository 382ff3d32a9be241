from __future__ import annotations

import pytest
import torch

from guardrail.errors import UsageError
from guardrail.pruning import (
    PruningConfig,
    attention_from_rows,
    attention_to_columns,
    embedding_similarity,
    keep_count,
    select_tokens,
)


def test_keep_count():
    assert keep_count(100, 0.25) == 25 and keep_count(10, 0.01) == 1
    assert keep_count(7, 1.0) == 7 and keep_count(0, 0.5) == 0 and keep_count(9, 0.5) == 5


def test_select_is_union_of_per_policy_topk_within_budget():
    rel = torch.tensor([[0.9, 0.1, 0.8, 0.0, 0.2, 0.3],
                        [0.0, 0.7, 0.1, 0.6, 0.2, 0.1]])
    assert select_tokens(rel, 4 / 6).tolist() == [0, 1, 2, 3]   # top-2 of each
    assert select_tokens(rel, 2 / 6).tolist() == [0, 1]         # top-1 of each
    # budget 3: both top-1s, then the better of the two rank-2 tokens (2: 0.8 beats 3: 0.6)
    assert select_tokens(rel, 3 / 6).tolist() == [0, 1, 2]
    assert select_tokens(rel, 1.0).tolist() == list(range(6))


def test_select_keeps_exactly_the_budget_and_ignores_policy_order():
    gen = torch.Generator().manual_seed(0)
    rel = torch.rand(6, 200, generator=gen)
    for ratio in (0.1, 0.25, 0.5):
        kept = select_tokens(rel, ratio)
        assert kept.numel() == keep_count(200, ratio)
        assert torch.equal(kept, select_tokens(rel[torch.randperm(6, generator=gen)], ratio))
        # every policy's single best token survives
        assert set(rel.argmax(dim=1).tolist()) <= set(kept.tolist())


def test_select_ties_are_deterministic():
    rel = torch.zeros(3, 8)
    assert select_tokens(rel, 0.25).tolist() == [0, 1]


def test_attention_reductions():
    w = torch.rand(2, 5, 7).softmax(-1)                # [H, n, K]
    rows = [torch.tensor([0, 1]), torch.tensor([4])]
    cols = torch.tensor([2, 3, 6])
    got = attention_to_columns(w, rows, cols)
    assert got.shape == (2, 3)
    assert torch.allclose(got[1], w.mean(0)[4, cols])
    got = attention_from_rows(w, torch.tensor([0, 2]), [torch.tensor([1, 2]), torch.tensor([5])])
    assert got.shape == (2, 2)
    assert torch.allclose(got[0, 1], w.mean(0)[2, [1, 2]].sum())


def test_embedding_similarity_prefers_aligned_tokens():
    visual = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    pol = [torch.tensor([[2.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 3.0]])]
    sim = embedding_similarity(visual, pol)
    assert sim.argmax(dim=1).tolist() == [0, 1]
    assert sim[0, 0] == pytest.approx(1.0)


@pytest.mark.parametrize("kw", [dict(keep_ratio=0.0), dict(keep_ratio=1.5), dict(mode="x"),
                                dict(layer=-1)])
def test_config_validation(kw):
    with pytest.raises(UsageError):
        PruningConfig(**kw)


def test_config_bounds_are_inclusive_where_they_should_be():
    """Layer 0 and keep ratio 1.0 are valid; 1.0 means pruning is off, anything below is on."""
    assert PruningConfig(layer=0).layer == 0
    assert not PruningConfig(keep_ratio=1.0).active
    assert PruningConfig(keep_ratio=1 - 1e-9).active
