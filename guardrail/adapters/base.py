"""What the engine needs from a model family, and nothing more.

The engine owns layout, masks, caches and probes; an adapter only knows its model's
tokenizer, processor, visual encoder and language-model call. Every tensor crossing this line
is batch-1 and explicit: ids, positions, additive masks, caches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from guardrail.layout import Visibility
from guardrail.video import Clip


@dataclass(frozen=True)
class VideoInputs:
    """One clip, ready for the model: the video segment's tokens and the encoder's inputs."""

    ids: torch.Tensor          # [L] int64: the whole video segment (start/end marks, timestamps)
    rel_pos: torch.Tensor      # [rows, L] int64 positions relative to the segment start
    advance: int               # positions the segment moves the counter by
    visual: torch.Tensor       # [L] bool: tokens that take a visual embedding
    encoder_inputs: dict[str, torch.Tensor]  # pixel values, grid sizes ... for the visual encoder

    @property
    def num_visual(self) -> int:
        return int(self.visual.sum())


@dataclass(frozen=True)
class VisualFeatures:
    embeds: torch.Tensor                       # [Nv, D] one row per visual token, in order
    deepstack: tuple[torch.Tensor, ...] = ()   # Qwen3-VL: per injected layer, [Nv, D]

    def select(self, keep: torch.Tensor) -> VisualFeatures:
        """Rows `keep` ([k] int64 or [Nv] bool) of every feature tensor."""
        return VisualFeatures(self.embeds[keep], tuple(d[keep] for d in self.deepstack))


class ModelAdapter(Protocol):
    """A loaded model family behind the engine's one interface."""

    family: str
    rows: int                  # rows of position ids: 3 for mRoPE, 1 for ordinary RoPE
    model: Any
    tokenizer: Any
    name: str                  # what the verdict reports as `model`

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def encode_text(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""

    def chat_frame(self) -> tuple[str, str]:
        """(text before the user's message, text after it up to the assistant's answer)."""

    def video_inputs(self, clip: Clip) -> VideoInputs:
        """Run the family's official processor on a clip's frames (with their real fps)."""

    def visual_features(self, video: VideoInputs) -> VisualFeatures:
        """Run the visual encoder."""

    def visual_features_many(self, videos: list[VideoInputs]) -> list[VisualFeatures]:
        """`visual_features` of several clips, in one encoder call where the family allows."""

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """[T] ids -> [T, D] input embeddings."""

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, visible: Visibility,
                cache: Any, visual: torch.Tensor | None = None,
                deepstack: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        """Language model over new tokens. embeds [B, T, D], positions [rows, B, T], `visible`
        the step's per-token visibility vectors (K = cached + T keys; the adapter's attention
        backend builds its mask from them on the device), cache a DynamicCache (mutated).
        `visual` [B, T] bool marks visual tokens for `deepstack` (non-empty only in steps
        holding visual tokens). Returns hidden [B, T, D]."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., D] hidden states -> [..., V] next-token logits (fp32)."""

    def answer_logits(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """[..., D] hidden states -> [..., len(ids)] fp32 logits of vocabulary rows `ids`."""

    def new_cache(self) -> Any:
        """An empty KV cache for this model."""
