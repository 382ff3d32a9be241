"""The Qwen-VL mRoPE formula as the Qwen team released it (Qwen2-VL in transformers 4.45,
Qwen2.5-VL in 4.49, Qwen3-VL in 4.57), written out here loop by loop so tests can check
`guardrail.adapters.mrope` and pass reference positions to transformers' forward.

It scans for `<|vision_start|>` and reads the token after it, as the original does; the next
text after a visual block starts at the largest position used so far + 1.
"""

from __future__ import annotations

import torch


def original_positions(ids: list[int], family: str, *, vision_start: int, image_token: int,
                       video_token: int, image_grids=(), video_grids=(), second_per_grid=(),
                       merge: int = 2, tokens_per_second: float = 2.0) -> torch.Tensor:
    """[3, L] positions of one sequence, as the original `get_rope_index` computes them."""
    video_grids = [list(map(int, g)) for g in video_grids]
    seconds = list(second_per_grid)
    if family == "qwen3_vl":            # 4.57: videos are split into frames of t = 1
        seconds = [s for g, s in zip(video_grids, seconds or [0.0] * len(video_grids), strict=True)
                   for _ in range(g[0])]
        video_grids = [[1, h, w] for t, h, w in video_grids for _ in range(t)]
    image_grids = [list(map(int, g)) for g in image_grids]
    pieces, st = [], 0
    image_i = video_i = 0
    starts = [i for i, tok in enumerate(ids) if tok == vision_start]
    for s in starts:
        if s + 1 >= len(ids) or ids[s + 1] not in (image_token, video_token):
            continue
        ed = s + 1
        if ids[ed] == image_token:
            t, h, w = image_grids[image_i]
            image_i, sec = image_i + 1, 0.0
        else:
            t, h, w = video_grids[video_i]
            sec = seconds[video_i] if video_i < len(seconds) else 1.0
            video_i += 1
        gt, gh, gw = t, h // merge, w // merge
        st_idx = int(pieces[-1].max()) + 1 if pieces else 0
        text_len = ed - st
        pieces.append(torch.arange(text_len).view(1, -1).expand(3, -1) + st_idx)
        if family == "qwen2_5_vl":
            time = (torch.arange(gt).view(-1, 1).expand(-1, gh * gw) * sec
                    * tokens_per_second).long().flatten()
        else:
            time = torch.arange(gt).view(-1, 1).expand(-1, gh * gw).flatten()
            if family == "qwen3_vl":
                time = torch.zeros_like(time)
        hh = torch.arange(gh).view(1, -1, 1).expand(gt, -1, gw).flatten()
        ww = torch.arange(gw).view(1, 1, -1).expand(gt, gh, -1).flatten()
        pieces.append(torch.stack([time, hh, ww]) + text_len + st_idx)
        st = ed + gt * gh * gw
    if st < len(ids):
        st_idx = int(pieces[-1].max()) + 1 if pieces else 0
        pieces.append(torch.arange(len(ids) - st).view(1, -1).expand(3, -1) + st_idx)
    return torch.cat(pieces, dim=1)
