"""Checkpoint conversion: original InternVL2-chat (SafeWatch-8B) -> native transformers InternVL."""

from __future__ import annotations

from guardrail.convert.command import convert

__all__ = ["convert"]
