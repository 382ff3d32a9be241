"""Text after the verdict: greedy decoding over the prefilled KV cache, held to the output
skeleton so the answer always parses (SPEC §4.4 `explain`).

    DESCRIPTION: <generated, one line>
    GUARDRAIL: <the fast verdict, forced>
    EXPLANATION: <generated, one line>
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from guardrail.adapters.base import ModelAdapter
from guardrail.verdict import guardrail_json


@dataclass(frozen=True)
class Explanation:
    description: str
    explanation: str
    text: str                  # the whole answer, as a SafeWatch-style model would write it
    new_tokens: int            # tokens generated (forced skeleton tokens not counted)


class Decoder:
    """Greedy decoding that continues a cache whose every entry the answer may see."""

    def __init__(self, adapter: ModelAdapter, cache: Any, next_position: int, stop_ids: set[int]):
        self.adapter = adapter
        self.cache = cache
        self.position = next_position
        self.stop_ids = stop_ids

    def feed(self, ids: list[int]) -> torch.Tensor:
        """Append `ids` to the cache; return the next-token logits [V]."""
        n, past = len(ids), self.cache.get_seq_length()
        pos = torch.arange(self.position, self.position + n).expand(self.adapter.rows, 1, n)
        visible = torch.ones(n, past + n, dtype=torch.bool).tril(past)   # [n, past + n]
        embeds = self.adapter.embed(torch.tensor(ids))[None]
        hidden = self.adapter.forward(embeds, pos, visible[None], self.cache)
        self.position += n
        return self.adapter.logits(hidden[0, -1])

    def line(self, logits: torch.Tensor, budget: int) -> tuple[str, int]:
        """Greedy tokens until one holding a newline, a stop token, or `budget` tokens. Every
        accepted token is in the cache; the ending token is not. Returns (text, tokens)."""
        out: list[int] = []
        for _ in range(budget):
            tok = int(logits.argmax())
            if tok in self.stop_ids or "\n" in self.adapter.tokenizer.decode([tok]):
                break
            out.append(tok)
            logits = self.feed([tok])
        return self.adapter.tokenizer.decode(out, skip_special_tokens=True).strip(), len(out)


def explain(decoder: Decoder, keys: list[str], flags: list[bool], max_new_tokens: int
            ) -> Explanation:
    """Generate the description and the explanation around the forced verdict line."""
    enc = decoder.adapter.encode_text
    budget_desc = max(1, max_new_tokens // 3)
    logits = decoder.feed(enc("DESCRIPTION:"))
    description, used = decoder.line(logits, budget_desc)
    verdict = guardrail_json(keys, flags)
    logits = decoder.feed(enc(f"\nGUARDRAIL: {verdict}\nEXPLANATION:"))
    explanation, used2 = decoder.line(logits, max_new_tokens - used)
    text = f"DESCRIPTION: {description}\nGUARDRAIL: {verdict}\nEXPLANATION: {explanation}"
    return Explanation(description, explanation, text, used + used2)
