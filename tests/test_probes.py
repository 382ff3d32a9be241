"""The probe's answer tokens and scores (guardrail/probes.py) on hand-made tokenizations."""

from __future__ import annotations

import pytest
import torch

from guardrail.errors import ModelError
from guardrail.probes import answer_tokens, probe_scores


def _encoder(table: dict[str, list[int]]):
    return lambda text: table[text]


def test_answer_ids_are_the_first_tokens_after_the_key():
    enc = _encoder({'":': [7, 8], '": true': [7, 8, 30, 31], '": false': [7, 8, 40]})
    ans = answer_tokens(enc)
    assert (ans.true_id, ans.false_id) == (30, 40) and ans.ids == [30, 40]


@pytest.mark.parametrize("table", [
    {'":': [7, 8], '": true': [7, 9, 30], '": false': [7, 8, 40]},    # true merges into the key
    {'":': [7, 8], '": true': [7, 8, 30], '": false': [7, 9, 40]},    # false merges into the key
    {'":': [7, 8], '": true': [7, 8], '": false': [7, 8, 40]},        # nothing after the key
    {'":': [7, 8], '": true': [7, 8, 5, 1], '": false': [7, 8, 5, 2]},  # same first token
], ids=["true-merges", "false-merges", "empty", "same-first"])
def test_tokenizers_that_cannot_probe_are_refused(table):
    with pytest.raises(ModelError):
        answer_tokens(_encoder(table))


def test_score_is_probability_of_true():
    pair = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    want = torch.sigmoid(torch.tensor([2.0, -2.0, 0.0]))
    assert torch.allclose(probe_scores(pair), want)
    assert probe_scores(pair.to(torch.bfloat16)).dtype == torch.float32
