"""What every adapter over a transformers vision-language model shares: the loaded model, its
tokenizer, the language model call with explicit positions and masks, logits, caches. Family
adapters subclass it and add how frames become video inputs and visual features."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import DynamicCache

from guardrail.adapters.attention import AttentionCapture
from guardrail.layout import Visibility
from guardrail.tiny import TEST_MODEL_KEY, TEST_MODEL_WARNING

SENTINEL = "\u2063GUARDRAIL_MESSAGE\u2063"   # stands for the message in a chat template


class TransformersAdapter:
    """Base of the family adapters (see `adapters.base.ModelAdapter` for the contract)."""

    rows = 1

    def __init__(self, model: Any, processor: Any, name: str, attn: str | None = None):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.name = name
        self.family = model.config.model_type
        self._lm = model.model.language_model
        params = inspect.signature(self._lm.forward).parameters
        # NOTE: transformers 5.2x renamed `past_key_values` to `cache`; 5.17 knows only the old one
        # and silently swallows `cache=` into **kwargs (wrong logits, no error).
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._lm_params = set(params)
        self.capture = AttentionCapture(self._lm, attn)
        # what every verdict of this model must carry
        self.warnings = ((TEST_MODEL_WARNING,) if getattr(model.config, TEST_MODEL_KEY, False)
                         else ())

    @property
    def context_length(self) -> int | None:
        """Positions the language model was built for (None when the config does not say)."""
        return getattr(self.model.config.get_text_config(), "max_position_embeddings", None)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def chat_frame(self) -> tuple[str, str]:
        text = self._chat_template([{"role": "user", "content": self._message(SENTINEL)}])
        before, after = text.split(SENTINEL)
        return before, after

    def _message(self, text: str) -> Any:
        return text

    def _chat_template(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=False)

    def visual_features_many(self, videos: list) -> list:
        """Visual features of several clips; families whose encoder batches override this."""
        return [self.visual_features(v) for v in videos]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids.to(self.device))

    def _positions(self, positions: torch.Tensor) -> torch.Tensor:
        """[rows, B, T] engine positions -> what this language model takes."""
        return positions

    @torch.inference_mode()
    def forward(self, embeds, positions, visible, cache, visual=None, deepstack=()):
        kwargs: dict[str, Any] = {self._cache_kw: cache, **self._extra(visual, deepstack)}
        out = self._lm(inputs_embeds=embeds, position_ids=self._positions(positions).to(
                           self.device),
                       attention_mask=self._mask(visible, embeds.shape[0]),
                       use_cache=True, **kwargs)
        return out.last_hidden_state

    def _mask(self, visible: Visibility, batch: int) -> Any:
        """The backend's mask for the step, or None when the layout says it is exactly causal
        over the whole cache (sequential prefills, decode steps): the backend's own causal
        path is faster than any explicit mask."""
        if visible.causal:
            return None
        return self.capture.mask(visible, self.dtype, batch)

    def _extra(self, visual, deepstack) -> dict[str, Any]:
        """Extra language-model arguments for the visual tokens of this forward (none here)."""
        return {}

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden).float()

    @torch.inference_mode()
    def answer_logits(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """[..., D] hidden -> [..., len(ids)] logits of the vocabulary rows `ids` only, in fp32
        (a bf16 head over the whole vocabulary moves a probe score by up to 0.02)."""
        head = self.model.lm_head
        rows = head.weight[ids].float()                                   # [n, D]
        out = hidden.float() @ rows.T
        if getattr(head, "bias", None) is not None:
            out = out + head.bias[ids].float()
        return out

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config.get_text_config())
