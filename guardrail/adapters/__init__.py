"""Model adapters: one protocol, one registry entry per model family (read from the config)."""

from guardrail.adapters.base import ModelAdapter, VideoInputs, VisualFeatures
from guardrail.adapters.registry import FAMILIES, create_adapter

__all__ = ["FAMILIES", "ModelAdapter", "VideoInputs", "VisualFeatures", "create_adapter"]
