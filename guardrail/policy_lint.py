"""`guardrail policy lint`: what a policy set costs the model, and warnings an author can act on.

Per category the tokens of its chunk, per layout the tokens of the whole prompt without the video
(and the chat template) against the model's context, and warnings: a chunk much longer than the
others (under the parallel layouts every chunk's positions run to the longest one), rules
repeated across categories, a category without `allowed` look-alikes whose blocked rules name
things that are usually benign, thresholds far from the set's default. With `--model` the
counts use that model's own tokenizer and context; without, they are an estimate (4 characters
per token) and the fit is not checked, and the report says so.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from guardrail.policy import PolicySet
from guardrail.prompt import LAYOUTS, VIDEO_SLOT, build_prompt, prompt_segments

# blocked rules naming these are often benign in context: an `allowed` list helps the model
BENIGN_HINTS = ("art", "artwork", "sport", "sports", "medical", "news", "education",
                "educational", "documentary", "history", "historical", "museum", "game",
                "games", "cooking", "hunting", "fiction", "film", "satire", "parody")
LONG_CHUNK = 2.0            # x the median chunk, and
LONG_CHUNK_MIN = 64         # at least this many tokens
FAR_THRESHOLD = 0.3


@dataclass
class Report:
    file: str
    tokenizer: str
    categories: list[dict] = field(default_factory=list)     # [{"id", "tokens"}]
    prompt_tokens: dict[str, int] = field(default_factory=dict)
    context: int | None = None
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("tokenizer")
        return {"file": out.pop("file"), **out}


def estimate(text: str) -> int:
    return max(1, round(len(text) / 4))


def lint(pset: PolicySet, file: str, count: Callable[[str], int] = estimate,
         tokenizer: str = "an estimate (4 characters per token; --model counts exactly)",
         context: int | None = None) -> Report:
    report = Report(file, tokenizer, context=context)
    prompt = build_prompt(pset)
    tokens = [count(chunk) for chunk in prompt.chunks]
    report.categories = [{"id": c.id, "tokens": n} for c, n in zip(pset.categories, tokens,
                                                                     strict=True)]
    probes = sum(count(p) for p in prompt.probes)
    for layout in LAYOUTS:
        texts = [t.replace(VIDEO_SLOT, "") if kind == "video" else t
                 for kind, t in prompt_segments(prompt, layout)]
        report.prompt_tokens[layout] = sum(count(t) for t in texts) + probes
    if context is not None:
        need = max(report.prompt_tokens.values())
        if need >= context:
            report.errors.append(f"the prompt needs {need:,} tokens before the video; the "
                                 f"model's context is {context:,} tokens")
    report.warnings = _warnings(pset, tokens)
    return report


def _warnings(pset: PolicySet, tokens: list[int]) -> list[str]:
    out = []
    median = statistics.median(tokens)
    for c, n in zip(pset.categories, tokens, strict=True):
        if len(tokens) > 1 and n >= LONG_CHUNK_MIN and n > LONG_CHUNK * median:
            out.append(f"{c.id}: its chunk is {n} tokens, {n / median:.1f}x the median "
                       f"({median:g}); under the parallel layouts every chunk's positions run "
                       "to the longest one, so shorten it or split the category")
    seen: dict[str, str] = {}
    for c in pset.categories:
        for rule in c.blocked:
            key = " ".join(rule.lower().split())
            if key in seen and seen[key] != c.id:
                out.append(f"{c.id}: blocked rule {rule!r} repeats one of {seen[key]}")
            seen.setdefault(key, c.id)
    for c in pset.categories:
        words = {w.strip(".,;:()'\"").lower() for rule in c.blocked for w in rule.split()}
        named = sorted(words & set(BENIGN_HINTS))
        if not c.allowed and named:
            out.append(f"{c.id}: blocked rules mention {', '.join(named)} but the category has "
                       "no `allowed` look-alikes; say what stays allowed (news, art, ...)")
    default = pset.defaults.threshold
    for c in pset.categories:
        t = pset.threshold_of(c)
        if abs(t - default) >= FAR_THRESHOLD:
            out.append(f"{c.id}: threshold {t:g} is far from the set's default {default:g}; "
                       "check it against labelled examples (guardrail bench calibrate)")
    return out


def model_counter(model: str) -> tuple[Callable[[str], int], str, int | None]:
    """The model's own tokenizer (no weights loaded) and its context length."""
    from transformers import AutoConfig, AutoTokenizer

    from guardrail.errors import UsageError

    try:
        tok = AutoTokenizer.from_pretrained(model)
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load the tokenizer of {model}: {err}") from None
    context = getattr(config.get_text_config(), "max_position_embeddings", None)
    return (lambda text: len(tok.encode(text, add_special_tokens=False)),
            f"{model} ({type(tok).__name__})", context)
