"""Native transformers InternVL with a Llama text model (SafeWatch-8B after
`guardrail model convert`, or `make-tiny --family internvl`).

Frames are prepared the way SafeWatch's evaluation prepares them: each frame is one tile, resized
with PIL bicubic to the model's image size and ImageNet-normalised (the image size and the
normalisation come from the model's own config and processor, never hardcoded), and the video
segment reads `Frame1: <img><IMG_CONTEXT>...</img>\\nFrame2: ...` as InternVL's chat code lays it
out. Positions are ordinary 1-D RoPE, so a segment of L tokens takes positions 0..L-1.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from guardrail.adapters.base import VideoInputs, VisualFeatures
from guardrail.adapters.transformers_lm import TransformersAdapter
from guardrail.errors import UsageError
from guardrail.layout import HOST
from guardrail.video import Clip, resize


class InternVLAdapter(TransformersAdapter):
    rows = 1

    def __init__(self, model: Any, processor: Any, name: str, attn: str | None = None):
        super().__init__(model, processor, name, attn)
        config = model.config
        self._vocab = config.get_text_config().vocab_size
        self._context_id = config.image_token_id
        size = config.vision_config.image_size
        self._size = int(size[0] if isinstance(size, (list, tuple)) else size)
        self._per_frame = config.image_seq_length
        image_processor = processor.image_processor
        self._mean = np.asarray(image_processor.image_mean, dtype=np.float32)
        self._std = np.asarray(image_processor.image_std, dtype=np.float32)
        tok = self.tokenizer
        self._img_start = tok.convert_tokens_to_ids(tok.start_image_token)
        self._img_end = tok.convert_tokens_to_ids(tok.end_image_token)
        self._labels: dict[int, list[int]] = {}

    def encode_text(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if ids and max(ids) >= self._vocab:
            bad = sorted({self.tokenizer.convert_ids_to_tokens(i) for i in ids if i >= self._vocab})
            raise UsageError(f"text contains token(s) {', '.join(bad)} that this model has no "
                             "embedding for; remove them from the policy text")
        return ids

    def video_inputs(self, clip: Clip) -> VideoInputs:
        pixels = self._pixels(clip.frames)                                # [N, 3, S, S]
        ids: list[int] = []
        for i in range(pixels.shape[0]):
            ids += self._frame_label(i)
            ids += [self._img_start, *[self._context_id] * self._per_frame, self._img_end]
        ids_t = torch.tensor(ids, dtype=torch.long, device=HOST)
        length = ids_t.numel()
        return VideoInputs(ids=ids_t, rel_pos=torch.arange(length, device=HOST)[None],
                           advance=length,
                           visual=ids_t == self._context_id,
                           encoder_inputs={"pixel_values": pixels})

    def _frame_label(self, i: int) -> list[int]:
        """Ids of "FrameN: " before frame i, tokenized once (windows are prepared on worker
        threads; this keeps the tokenizer out of them after the first window)."""
        if i not in self._labels:
            self._labels[i] = self.encode_text(("\n" if i else "") + f"Frame{i + 1}: ")
        return self._labels[i]

    # where frames are resized: on the model's device when it is a GPU (Pillow's bicubic as
    # tensor math, bit for bit; guardrail.video.resize), else with Pillow on the host
    resize_on_device: bool | None = None          # None: on the device when it is CUDA

    def _pixels(self, frames: np.ndarray) -> torch.Tensor:
        """[N, H, W, 3] uint8 -> [N, 3, S, S] float: PIL bicubic resize, /255, ImageNet norm
        (SafeWatch's `load_video(..., max_num=1)`: one tile per frame, no thumbnail)."""
        on_device = self.resize_on_device
        if on_device is None:
            on_device = self.device.type == "cuda"
        size = (self._size, self._size)
        if on_device and resize.exact(*frames.shape[1:3], size, self.device):
            return self._pixels_on_device(frames)  # else this Pillow does something else here
        from PIL import Image

        out = [np.asarray(Image.fromarray(f).convert("RGB").resize(size, Image.BICUBIC),
                          dtype=np.float32) / 255.0 for f in frames]
        arr = (np.stack(out) - self._mean) / self._std                    # [N, S, S, 3]
        return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()

    def _pixels_on_device(self, frames: np.ndarray) -> torch.Tensor:
        """`_pixels` with the resize and normalisation on the model's device: the same values
        bit for bit (Pillow's fixed-point resize as exact float64 products, then the same
        float32 arithmetic), the frames copied once as uint8."""
        raw = torch.from_numpy(np.ascontiguousarray(frames))
        if self.device.type == "cuda":
            raw = raw.pin_memory()
        raw = raw.to(self.device, non_blocking=True)
        x = resize.resize_like_pillow(raw, (self._size, self._size)).to(torch.float32) / 255.0
        mean, std = (torch.from_numpy(a).to(self.device)[None, :, None, None]
                     for a in (self._mean, self._std))
        return (x - mean) / std                                            # [N, 3, S, S]

    def visual_features(self, video: VideoInputs) -> VisualFeatures:
        return self.visual_features_many([video])[0]

    @torch.inference_mode()
    def visual_features_many(self, videos: list[VideoInputs]) -> list[VisualFeatures]:
        """One vision-tower call for the frames of every clip (each frame is one image)."""
        pixels = torch.cat([v.encoder_inputs["pixel_values"].to(self.device, non_blocking=True)
                            for v in videos]).to(self.dtype)      # joined on the device
        out = self.model.model.get_image_features(pixel_values=pixels, return_dict=True)
        embeds = out.pooler_output                                        # [N, per_frame, D]
        embeds = embeds.reshape(-1, embeds.shape[-1]).to(self.dtype)
        counts = [v.num_visual for v in videos]
        assert embeds.shape[0] == sum(counts), (
            f"encoder gave {embeds.shape[0]} visual embeddings for {sum(counts)} tokens")
        return [VisualFeatures(part) for part in embeds.split(counts)]

    def _positions(self, positions: torch.Tensor) -> torch.Tensor:
        return positions[0]   # [1, B, T] (one row: plain RoPE) -> the [B, T] Llama takes
