"""What the engine's answers should be, computed without the engine: transformers' own model
forward over one plain token sequence, with the model, processor and tokenizer loaded here.

Only the prompt's *text* comes from guardrail (`guardrail.prompt`, which has its own tests);
tokens, video inputs, positions, masks, visual features, attention and logits are all
transformers'. Frames for InternVL are prepared as SafeWatch's evaluation prepares them (one
tile per frame, PIL bicubic, the processor's mean and std).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rope_reference import original_positions
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.video_utils import VideoMetadata

from guardrail.video import Clip

VIDEO = "\x01VIDEO\x01"       # stands for the video in a prompt text until `inputs` expands it


@dataclass
class Inputs:
    """One sequence for the model: its keyword arguments and where its video tokens are."""

    kwargs: dict[str, torch.Tensor]
    second_per_grid: tuple[float, ...] = ()     # per video: temporal patch / sampled fps

    @property
    def ids(self) -> torch.Tensor:      # [T]
        return self.kwargs["input_ids"][0]

    def extended(self, new: list[int]) -> Inputs:
        """The same sequence with text tokens `new` appended."""
        extra = torch.tensor([new], dtype=torch.long)
        kw = dict(self.kwargs, input_ids=torch.cat([self.kwargs["input_ids"], extra], dim=1))
        for key, fill in (("attention_mask", 1), ("mm_token_type_ids", 0)):
            if key in kw:
                kw[key] = torch.cat([kw[key], torch.full_like(extra, fill)], dim=1)
        return Inputs(kw, self.second_per_grid)


class Reference:
    """A family's model in fp32 with eager attention (so attention weights can be read)."""

    def __init__(self, path: Path):
        self.model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=torch.float32, attn_implementation="eager").eval()
        self.processor = AutoProcessor.from_pretrained(path)
        self.tokenizer = self.processor.tokenizer
        self.family = self.model.config.model_type
        cfg = self.model.config
        self.visual_id = cfg.image_token_id if self.family == "internvl" else cfg.video_token_id
        head = self.encode('":')
        self.true_id = self.encode('": true')[len(head)]
        self.false_id = self.encode('": false')[len(head)]
        assert self.true_id != self.false_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def chat(self, text: str) -> str:
        """`text` as the user's message, up to the start of the assistant's answer."""
        if self.family == "internvl":
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
        return self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": text}]}],
            add_generation_prompt=True, tokenize=False)

    def inputs(self, text: str, clip: Clip) -> Inputs:
        """Model inputs of `text` (holding VIDEO once) with `clip` in place of VIDEO."""
        if self.family == "internvl":
            return self._internvl_inputs(text, clip)
        p = self.processor
        start = getattr(p, "vision_start_token", "<|vision_start|>")
        end = getattr(p, "vision_end_token", "<|vision_end|>")
        video = f"{start}{p.video_token}{end}"
        win = clip.window        # the sampled presentation times, in milliseconds
        meta = VideoMetadata(
            total_num_frames=max(len(win.indices), round((win.end_s - win.start_s) * 1000)),
            fps=1000.0, height=clip.frames.shape[1], width=clip.frames.shape[2],
            duration=win.end_s - win.start_s,
            frames_indices=[round(t * 1000) for t in win.timestamps_s])
        out = p(text=[text.replace(VIDEO, video)], videos=[clip.frames], video_metadata=[meta],
                do_sample_frames=False, return_tensors="pt")
        fps = len(meta.frames_indices) / meta.total_num_frames * meta.fps
        return Inputs(dict(out), (p.video_processor.temporal_patch_size / fps,))

    def _internvl_inputs(self, text: str, clip: Clip) -> Inputs:
        cfg = self.model.config
        size = cfg.vision_config.image_size
        size = int(size[0] if isinstance(size, (list, tuple)) else size)
        tok = self.tokenizer
        frames = "\n".join(f"Frame{i + 1}: {tok.start_image_token}"
                           f"{'<IMG_CONTEXT>' * cfg.image_seq_length}{tok.end_image_token}"
                           for i in range(len(clip.frames)))
        from PIL import Image

        ip = self.processor.image_processor
        mean, std = np.asarray(ip.image_mean), np.asarray(ip.image_std)
        tiles = [np.asarray(Image.fromarray(f).convert("RGB").resize((size, size),
                                                                     Image.BICUBIC)) / 255.0
                 for f in clip.frames]
        pixels = torch.from_numpy(((np.stack(tiles) - mean) / std).astype(np.float32))
        ids = torch.tensor([self.encode(text.replace(VIDEO, frames))])
        return Inputs({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                       "pixel_values": pixels.permute(0, 3, 1, 2).contiguous()})

    @torch.no_grad()
    def forward(self, inputs: Inputs, attentions: bool = False):
        kwargs = dict(inputs.kwargs)
        if self.family != "internvl":       # the original release's positions, not 5.x's
            kwargs["position_ids"] = self.positions(inputs)[:, None]
        return self.model(**kwargs, output_attentions=attentions, return_dict=True)

    def positions(self, inputs: Inputs) -> torch.Tensor:
        """[3, T] the original formula's positions of a Qwen-VL sequence."""
        cfg = self.model.config
        vision = cfg.vision_config
        return original_positions(
            inputs.ids.tolist(), self.family, vision_start=cfg.vision_start_token_id,
            image_token=cfg.image_token_id, video_token=cfg.video_token_id,
            video_grids=inputs.kwargs["video_grid_thw"].tolist(),
            second_per_grid=inputs.second_per_grid, merge=vision.spatial_merge_size,
            tokens_per_second=getattr(vision, "tokens_per_second", 2.0) or 2.0)

    def logits(self, inputs: Inputs) -> torch.Tensor:      # [T, V] fp32
        return self.forward(inputs).logits[0].float()

    def probability_true(self, inputs: Inputs) -> float:
        """softmax over the next token's (` true`, ` false`) logits, P(true)."""
        last = self.logits(inputs)[-1]
        return float(torch.softmax(last[[self.true_id, self.false_id]], dim=0)[0])

    @torch.no_grad()
    def input_embeddings(self, inputs: Inputs) -> torch.Tensor:
        """[T, D] the embeddings the language model receives (visual rows included)."""
        seen = {}

        def hook(_module, args, kwargs):
            seen["embeds"] = kwargs["inputs_embeds"]

        handle = self.model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.forward(inputs)
        finally:
            handle.remove()
        return seen["embeds"][0].float()

    def stop_ids(self) -> set[int]:
        tok, gen = self.tokenizer, self.model.generation_config
        ids = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
        eos = gen.eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos])
        return {i for i in ids if i is not None}

    def greedy_line(self, inputs: Inputs, budget: int) -> tuple[Inputs, str, int]:
        """Greedy tokens, one full forward each (no cache), until a token holding a newline, a
        stop token, or `budget` tokens. Returns the sequence with the kept tokens, their text and
        their count (the token that ended the line is not kept)."""
        out: list[int] = []
        stop = self.stop_ids()
        for _ in range(budget):
            tok = int(self.logits(inputs)[-1].argmax())
            if tok in stop or "\n" in self.tokenizer.decode([tok]):
                break
            out.append(tok)
            inputs = inputs.extended([tok])
        return inputs, self.tokenizer.decode(out, skip_special_tokens=True).strip(), len(out)

    def explain(self, inputs: Inputs, keys: list[str], flags: list[bool], max_new_tokens: int
                ) -> tuple[str, str]:
        """The answer's two generated lines around the forced verdict, as SafeWatch writes it:
        DESCRIPTION (a third of the budget), the GUARDRAIL object, EXPLANATION (the rest)."""
        inputs = inputs.extended(self.encode("DESCRIPTION:"))
        inputs, description, used = self.greedy_line(inputs, max(1, max_new_tokens // 3))
        verdict = json.dumps(dict(zip(keys, flags, strict=True)), indent=4)
        inputs = inputs.extended(self.encode(f"\nGUARDRAIL: {verdict}\nEXPLANATION:"))
        _, explanation, _ = self.greedy_line(inputs, max_new_tokens - used)
        return description, explanation


def find(ids: torch.Tensor, part: list[int]) -> slice:
    """Where `part` occurs in `ids`; it must occur exactly once."""
    seq, n = ids.tolist(), len(part)
    hits = [i for i in range(len(seq) - n + 1) if seq[i: i + n] == part]
    assert len(hits) == 1, f"expected one occurrence, found {len(hits)}"
    return slice(hits[0], hits[0] + n)


def selection_violations(kept: set[int], relevance: torch.Tensor, eps: float = 1e-6
                         ) -> list[tuple[int, int]]:
    """Pairs (kept, dropped) that break "the kept tokens are the union of every policy's top-k":
    a token's rank under policy i is how many tokens policy i finds more relevant, its rank is
    its best over the policies, and no kept token may rank behind a dropped one. Ties (within
    `eps`) may go either way: a token counts its rank as low as its ties allow when kept, as
    high as they allow when dropped. relevance [m, N]."""
    rel = relevance.float()                                              # [m, N]
    greater = (rel[:, None, :] > rel[:, :, None] + eps).sum(-1)          # [m, N]: strictly better
    not_worse = (rel[:, None, :] >= rel[:, :, None] - eps).sum(-1) - 1   # [m, N]: ties included
    best, worst = greater.min(0).values, not_worse.min(0).values          # [N]
    dropped = set(range(rel.shape[1])) - kept
    return [(j, d) for j in kept for d in dropped if best[j] > worst[d]]
