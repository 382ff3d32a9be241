"""Verdict probes: the answer line up to a category's key, whose next token says
` true` or ` false`. Score = P(true) / (P(true) + P(false)) = sigmoid(logit_true - logit_false)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from guardrail.errors import ModelError


@dataclass(frozen=True)
class AnswerTokens:
    true_id: int
    false_id: int

    @property
    def ids(self) -> list[int]:
        """The two vocabulary rows a probe reads, in the order `probe_scores` expects."""
        return [self.true_id, self.false_id]


def answer_tokens(encode) -> AnswerTokens:
    """The ids of ` true` / ` false` as the first token after `":`. The two must differ in
    their first token, or a probe cannot tell them apart."""
    t, f = encode('": true'), encode('": false')
    head = encode('":')
    if t[: len(head)] != head or f[: len(head)] != head or len(t) == len(head):
        raise ModelError("tokenizer does not split '\": true' after '\":'; cannot probe verdicts")
    true_id, false_id = t[len(head)], f[len(head)]
    if true_id == false_id:
        raise ModelError("' true' and ' false' start with the same token; cannot probe verdicts")
    return AnswerTokens(true_id, false_id)


def probe_scores(pair: torch.Tensor) -> torch.Tensor:
    """[..., 2] logits of (` true`, ` false`) at each probe's last token (`AnswerTokens.ids`
    rows of the head, see `ModelAdapter.answer_logits`) -> scores [...] in [0, 1] (fp32)."""
    return torch.softmax(pair.float(), dim=-1)[..., 0]
