"""Text after the verdict: greedy decoding over the prefilled KV caches of a batch, every row
held to the output skeleton so the answer always parses (`explain` mode).

    DESCRIPTION: <generated, one line>
    GUARDRAIL: <the fast verdict, forced>
    EXPLANATION: <generated, one line>

All rows decode together, one forward per step: a row that generates feeds one token, a row
that reaches the end of its description feeds its forced verdict block in the same step, a row
that is done feeds nothing and waits. Each row's text is what decoding it alone gives (exactly in
fp32; in bf16 a padded batch step and a lone row's causal step round differently, so a near tie
between two tokens can go either way).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from guardrail.runner import Batch
from guardrail.verdict import guardrail_json


@dataclass(frozen=True)
class Explanation:
    description: str
    explanation: str
    text: str                  # the whole answer, as a SafeWatch-style model would write it
    new_tokens: int            # tokens generated (forced skeleton tokens not counted)


@dataclass
class _Row:
    forced: list[int]          # the verdict block fed after the description
    budget: int                # tokens this line may still take
    phase: int = 0             # 0 description, 1 explanation, 2 done
    out: list[int] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    used: int = 0


def opener(encode) -> list[int]:
    return encode("DESCRIPTION:")


def forced_block(encode, keys: list[str], flags: list[bool]) -> list[int]:
    return encode(f"\nGUARDRAIL: {guardrail_json(keys, flags)}\nEXPLANATION:")


def line_end(tokenizer, stop_ids: set[int]):
    """Whether a token ends the line being generated (a stop token, or one holding a
    newline); memoised per token id."""
    cache: dict[int, bool] = {}

    def ends(t: int) -> bool:
        if t not in cache:
            cache[t] = t in stop_ids or "\n" in tokenizer.decode([t])
        return cache[t]
    return ends


def room(encode, keys: list[str], flags: list[list[bool]], max_new_tokens: int,
         lead: list[int] = ()) -> int:
    """Answer tokens the rows can take: the lead, the opener, the longest of their forced
    blocks, the generated tokens and the one token that ends each line."""
    longest = max(len(forced_block(encode, keys, f)) for f in flags)
    return len(lead) + len(opener(encode)) + longest + max_new_tokens + 2


def explain_batch(batch: Batch, next_positions: list[int], keys: list[str],
                  flags: list[list[bool]], max_new_tokens: int, stop_ids: set[int],
                  lead: list[int] = ()) -> list[Explanation]:
    """Decode every row of `batch` (its cache: each window's prompt without the probes, answer
    positions from `next_positions[b]`) around its own forced verdict `flags[b]`, after the
    prompt tokens `lead` (the isolated layout's sequential tail; none otherwise)."""
    adapter = batch.adapter
    enc, tok = adapter.encode_text, adapter.tokenizer
    rows = [_Row(forced_block(enc, keys, f), max(1, max_new_tokens // 3)) for f in flags]
    batch.answer(next_positions)
    hidden = batch.extend([[*lead, *opener(enc)]] * len(rows))            # [B, D]
    ending = line_end(tok, stop_ids)

    while True:
        best = adapter.logits(hidden).argmax(dim=-1).tolist()            # one sync per step
        feed: list[list[int]] = [[] for _ in rows]
        for b, row in enumerate(rows):
            if row.phase == 2:
                continue
            if len(row.out) < row.budget and not ending(best[b]):
                row.out.append(best[b])
                feed[b] = [best[b]]
                continue
            row.lines.append(tok.decode(row.out, skip_special_tokens=True).strip())
            row.used += len(row.out)
            if row.phase == 0:
                feed[b] = row.forced
                row.budget, row.out = max_new_tokens - row.used, []
            row.phase += 1
        if not any(feed):
            break
        hidden = batch.extend(feed)
    out = []
    for row, f in zip(rows, flags, strict=True):
        description, explanation = row.lines
        text = (f"DESCRIPTION: {description}\nGUARDRAIL: {guardrail_json(keys, f)}\n"
                f"EXPLANATION: {explanation}")
        out.append(Explanation(description, explanation, text, row.used))
    return out
