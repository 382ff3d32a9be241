"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: one adapter, since transformers gives the three families
the same surface (official processor, `get_rope_index`, a language model taking 3-D positions).

What differs is data, not code: Qwen2.5-VL scales temporal ids by `second_per_grid_ts`, Qwen3-VL
puts per-frame timestamp text inside the video segment and adds DeepStack features at early
layers. The processor makes the tokens; positions come from each family's reference formula
(`adapters.mrope`, never the installed transformers' `get_rope_index`); DeepStack arrives as
`deepstack_features` from the visual encoder and is passed to the language model.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.video_utils import VideoMetadata

from guardrail.adapters import vision_attention
from guardrail.adapters.base import VideoInputs, VisualFeatures
from guardrail.adapters.mrope import MRope, mrope_positions
from guardrail.adapters.transformers_lm import SENTINEL, TransformersAdapter
from guardrail.layout import HOST
from guardrail.video import Clip


class QwenVLAdapter(TransformersAdapter):
    rows = 3

    def __init__(self, model: Any, processor: Any, name: str, attn: str | None = None):
        super().__init__(model, processor, name, attn)
        self._deepstack = "deepstack_visual_embeds" in self._lm_params
        self._video_token_id = model.config.video_token_id
        self.mrope = mrope_spec(model.config)
        tower = model.model.visual
        if "flash" not in str(tower.config._attn_implementation):   # flash is varlen already
            vision_attention.install(tower)

    def chat_frame(self) -> tuple[str, str]:
        return qwen_chat_frame(self.processor)

    def video_inputs(self, clip: Clip) -> VideoInputs:
        meta = clip_metadata(clip)
        # Video segment plus one trailing text token: its position tells the segment's advance.
        start, pad, end = self._video_marks()
        tail = self.encode_text("\n")[0]
        out = self.processor(
            text=[start + pad + end], videos=[clip.frames], video_metadata=[meta],
            do_sample_frames=False, return_tensors="pt",
        )
        ids = torch.cat([out["input_ids"][0], torch.tensor([tail], device=HOST)])
        types = torch.cat([out["mm_token_type_ids"][0],
                           torch.zeros(1, dtype=torch.long, device=HOST)])
        step = second_per_grid(self.processor.video_processor.temporal_patch_size, meta)
        pos = mrope_positions(types, self.mrope, video_grids=out["video_grid_thw"].tolist(),
                              second_per_grid=[step])                # [3, L + 1]
        encoder_inputs = {k: out[k] for k in ("pixel_values_videos", "video_grid_thw")}
        return VideoInputs(
            ids=ids[:-1], rel_pos=pos[:, :-1].contiguous(), advance=int(pos[0, -1]),
            visual=ids[:-1] == self._video_token_id, encoder_inputs=encoder_inputs,
        )

    def _video_marks(self) -> tuple[str, str, str]:
        p = self.processor
        start = getattr(p, "vision_start_token", None) or "<|vision_start|>"
        end = getattr(p, "vision_end_token", None) or "<|vision_end|>"
        return start, p.video_token, end

    def visual_features(self, video: VideoInputs) -> VisualFeatures:
        return self.visual_features_many([video])[0]

    @torch.inference_mode()
    def visual_features_many(self, videos: list[VideoInputs]) -> list[VisualFeatures]:
        """One visual-encoder call for several clips (the encoder takes a list of grids)."""
        # each clip's pixels go to the device on their own (pinned ones copy asynchronously; a
        # host-side cat would make a pageable copy first) and are joined there
        pixels = torch.cat([v.encoder_inputs["pixel_values_videos"].to(
            self.device, non_blocking=True) for v in videos])
        grid = torch.cat([v.encoder_inputs["video_grid_thw"] for v in videos])
        out = self.model.model.get_video_features(pixels, grid.to(self.device),
                                                  return_dict=True)
        embeds = _cat(out.pooler_output).to(self.dtype)                    # [sum Nv, D]
        deep = [_cat(d).to(self.dtype) for d in (getattr(out, "deepstack_features", None) or ())]
        counts = [v.num_visual for v in videos]
        assert embeds.shape[0] == sum(counts), (
            f"encoder gave {embeds.shape[0]} visual embeddings for {sum(counts)} tokens")
        parts = embeds.split(counts)
        deep_parts = [d.split(counts) for d in deep] if self._deepstack else []
        return [VisualFeatures(parts[i], tuple(d[i] for d in deep_parts))
                for i in range(len(videos))]

    def _extra(self, visual, deepstack) -> dict[str, Any]:
        if deepstack and visual is not None:         # the runner passes deepstack only then
            return {"visual_pos_masks": visual.to(self.device),
                    "deepstack_visual_embeds": list(deepstack)}
        return {}


TICKS = 1000.0   # the metadata's frame rate: sampled times in milliseconds of playback


def clip_metadata(clip: Clip) -> VideoMetadata:
    """What the processors (ours and vLLM's) are told about a clip's frames: when each was
    sampled, in milliseconds of playback (index / fps = its presentation time, which Qwen3-VL
    writes as timestamps), over the window's span, so the sampled rate is frames / window
    duration (Qwen2.5-VL's time ids) whatever the stream's nominal rate."""
    win = clip.window
    indices = [round(t * TICKS) for t in win.timestamps_s]
    return VideoMetadata(
        total_num_frames=max(len(indices), round((win.end_s - win.start_s) * TICKS)),
        fps=TICKS, height=clip.frames.shape[1], width=clip.frames.shape[2],
        duration=win.end_s - win.start_s, frames_indices=indices,
    )


def qwen_chat_frame(processor: Any) -> tuple[str, str]:
    """(text before the user's message, text after it up to the answer) of a Qwen-VL
    processor's chat template, the message given as one text part."""
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": SENTINEL}]}],
        add_generation_prompt=True, tokenize=False)
    before, after = text.split(SENTINEL)
    return before, after


def second_per_grid(temporal_patch_size: int, meta: VideoMetadata) -> float:
    """Seconds one temporal patch spans: temporal patch size / the sampled frame rate (the
    Qwen2.5-VL processor's definition, with the rate computed here on every version)."""
    sampled_fps = len(meta.frames_indices) / meta.total_num_frames * meta.fps
    return temporal_patch_size / sampled_fps


def mrope_spec(config: Any) -> MRope:
    vision = config.vision_config
    return MRope(config.model_type, int(getattr(vision, "spatial_merge_size", 2)),
                 float(getattr(vision, "tokens_per_second", 2.0) or 2.0))


def _cat(x: Any) -> torch.Tensor:
    return torch.cat(list(x), dim=0) if isinstance(x, (list, tuple)) else x
