"""mRoPE position ids of Qwen2-VL, Qwen2.5-VL and Qwen3-VL, from each model's reference formula
(the code the Qwen team released with the model), not from the installed transformers.

Why our own: transformers 5.x places the text after a Qwen2.5-VL video at the video's start +
max(h, w) / merge rather than after the largest position the video used, and until 2026-09 it
truncated fractional `second_per_grid_t` to whole seconds; the models were trained with the
original placement, and vLLM uses it. Positions must not depend on the library version.

The formula, per run of tokens in order (`st` = the largest position used so far + 1, 0 at the
start):
- a text run of n tokens: `st .. st + n - 1` on all three rows;
- a visual run with grid (t, h, w) after the spatial merge: row 0 `st + time(i)` for temporal
  index i, row 1 `st + row`, row 2 `st + column`, where time(i) is
  - Qwen2-VL: i;
  - Qwen2.5-VL: `int(i * second_per_grid_t * tokens_per_second)` for videos (quantised after the
    multiply), 0 for images;
  - Qwen3-VL: always 0 (a video is split per frame, each frame its own run of grid (1, h, w)
    between timestamp text).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from guardrail.layout import HOST

TEXT, IMAGE, VIDEO = 0, 1, 2


@dataclass(frozen=True)
class MRope:
    """What a family's formula needs besides the tokens."""

    family: str                 # qwen2_vl | qwen2_5_vl | qwen3_vl
    merge: int = 2              # spatial_merge_size
    tokens_per_second: float = 2.0   # Qwen2.5-VL's temporal scale


def grids_per_run(family: str, grids: Sequence[Sequence[int]]) -> list[tuple[int, int, int]]:
    """Video grids (t, h, w) as runs of video tokens: Qwen3-VL puts every frame in a run of its
    own (grid (1, h, w) t times); the others one run per video."""
    out = []
    for t, h, w in grids:
        out += [(1, int(h), int(w))] * int(t) if family == "qwen3_vl" else [(int(t), int(h),
                                                                              int(w))]
    return out


def mrope_positions(types: torch.Tensor, spec: MRope,
                    image_grids: Sequence[Sequence[int]] = (),
                    video_grids: Sequence[Sequence[int]] = (),
                    second_per_grid: Sequence[float] = ()) -> torch.Tensor:
    """Position ids [3, L] int64 (host) of one sequence. `types` [L]: 0 text, 1 image, 2 video;
    grids in patches before the merge, in order of appearance; `second_per_grid` per video
    (Qwen2.5-VL: temporal patch size / sampled fps)."""
    types = types.to(HOST)
    images = [(int(t), int(h), int(w)) for t, h, w in image_grids]
    videos = grids_per_run(spec.family, video_grids)
    seconds = list(second_per_grid)
    if spec.family == "qwen3_vl":          # every frame of a video shares its video's interval
        seconds = [s for (t, _, _), s in zip(video_grids, seconds or [0.0] * len(video_grids),
                                             strict=True) for _ in range(int(t))]
    out = torch.empty(3, types.numel(), dtype=torch.long, device=HOST)
    st, i, n = 0, 0, types.numel()
    image_k = video_k = 0
    while i < n:
        kind = int(types[i])
        if kind == TEXT:
            j = i
            while j < n and int(types[j]) == TEXT:
                j += 1
            out[:, i:j] = torch.arange(st, st + j - i, device=HOST)
            st += j - i
            i = j
            continue
        if kind == IMAGE:
            t, h, w = images[image_k]
            step, image_k = 0.0, image_k + 1
        else:
            t, h, w = videos[video_k]
            step = seconds[video_k] if video_k < len(seconds) else 1.0
            video_k += 1
        block = _visual(spec, kind, t, h // spec.merge, w // spec.merge, step)   # [3, t*h*w]
        size = block.shape[1]
        assert bool((types[i: i + size] == kind).all()), "visual run shorter than its grid"
        out[:, i: i + size] = block + st
        st += int(block.max()) + 1
        i += size
    return out


def _visual(spec: MRope, kind: int, t: int, h: int, w: int, step: float) -> torch.Tensor:
    """[3, t*h*w] positions of one visual run relative to its start."""
    frames = torch.arange(t, dtype=torch.long, device=HOST)
    if spec.family == "qwen2_5_vl":
        step = step if kind == VIDEO else 0.0
        # NOTE: as the original release computes it: int64 indices times a float32 interval,
        # (i * second_per_grid_t) * tokens_per_second in float32, truncated after the multiply.
        # vLLM 0.32 multiplies in float64 and can land one lower where the product is a whole
        # number in exact arithmetic (24 fps, 8 of 80 frames: 0, 1, 3, 4 here 0, 1, 3, 5).
        time = (frames.to(torch.float32) * step * spec.tokens_per_second).long()
    elif spec.family == "qwen3_vl":
        time = torch.zeros(t, dtype=torch.long, device=HOST)
    else:
        time = frames
    rows = torch.arange(h, dtype=torch.long, device=HOST)
    cols = torch.arange(w, dtype=torch.long, device=HOST)
    return torch.stack([time[:, None, None].expand(t, h, w).reshape(-1),
                        rows[None, :, None].expand(t, h, w).reshape(-1),
                        cols[None, None, :].expand(t, h, w).reshape(-1)])
