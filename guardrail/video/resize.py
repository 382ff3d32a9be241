"""Pillow's bicubic resize of RGB frames, bit for bit, as tensor math that runs on the model's
device (InternVL's preprocessing, which SafeWatch defines with Pillow).

Pillow resizes in two separable passes, each an 8-bit image: every output pixel is a weighted
sum of the input pixels under a bicubic kernel (a = -0.5, support 2, widened by the scale when
shrinking, so it antialiases), with the weights normalised and rounded to fixed point (22
fractional bits), the sum rounded and clipped to 0..255. Which pass runs first depends on the
sizes by an undocumented rule (Pillow 13: vertical first for portrait frames shrunk to a
square, among others), so `pillow_order` asks the installed Pillow once per resolution. Here
each pass is one matrix product with those integer weights, in float64 (every product and sum
is an integer below 2^53, so exact), then the same rounding and clipping: the result equals
`Image.resize(size, Image.BICUBIC)` exactly. torch's own antialiased bicubic does not (by up
to 11 levels on 21% of the pixels of a noisy 640x480 frame, float path; up to 2 levels on its
CPU-only uint8 path).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

PRECISION_BITS = 32 - 8 - 2          # Pillow's Resample.c


def _bicubic(x: float, a: float = -0.5) -> float:
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


@functools.lru_cache(maxsize=32)
def pillow_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] int64: Pillow's fixed-point bicubic weights for one axis
    (`precompute_coeffs` and `normalize_coeffs_8bpc` in Resample.c)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    out = np.zeros((out_size, in_size), dtype=np.int64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        ss = 1.0 / filterscale                                   # the same float ops as C
        k = [_bicubic((x + xmin - center + 0.5) * ss) for x in range(xmax - xmin)]
        total = sum(k)
        for x, w in enumerate(k):
            w = w / total if total != 0.0 else w
            fixed = w * (1 << PRECISION_BITS)
            out[xx, xmin + x] = math.trunc(fixed - 0.5) if w < 0 else math.trunc(fixed + 0.5)
    return out


def _pass(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One axis: x [..., in] (values 0..255, float64), weights [out, in] -> [..., out]."""
    acc = x @ weights.T + float(1 << (PRECISION_BITS - 1))
    return torch.floor(acc / float(1 << PRECISION_BITS)).clamp_(0, 255)


def _resize(chw: torch.Tensor, wx: torch.Tensor | None, wy: torch.Tensor | None,
            vertical_first: bool) -> torch.Tensor:
    """[3, H, W] float64 -> resized; None weights: that pass is skipped (no change there)."""
    def horizontal(x):
        return x if wx is None else _pass(x, wx)

    def vertical(x):
        return x if wy is None else _pass(x.transpose(1, 2), wy).transpose(1, 2)
    return horizontal(vertical(chw)) if vertical_first else vertical(horizontal(chw))


@functools.lru_cache(maxsize=64)
def pillow_order(h: int, w: int, out_h: int, out_w: int, device: str = "cpu") -> bool | None:
    """Which pass the installed Pillow runs first for this exact resize, found by resizing one
    noise image of that shape with Pillow and both ways here (noise is the hardest case: one
    wrong level shows): True vertical first, False horizontal first, None when neither order
    reproduces Pillow (then callers use Pillow). Pillow 13 picks the order from the sizes by a
    rule it does not document (vertical first for portrait frames shrunk to a square, for
    instance), so it is asked rather than guessed; once per resolution."""
    from PIL import Image

    if w == out_w or h == out_h:
        return False                            # one pass only: the order does not matter
    rng = np.random.default_rng(h * 7919 + w)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    want = torch.from_numpy(np.array(Image.fromarray(img).resize((out_w, out_h),
                                                                 Image.BICUBIC)))  # writable
    chw = torch.from_numpy(img).to(device).permute(2, 0, 1).to(torch.float64)
    wx = torch.from_numpy(pillow_weights(w, out_w)).to(device, torch.float64)
    wy = torch.from_numpy(pillow_weights(h, out_h)).to(device, torch.float64)
    for vertical_first in (False, True):
        got = _resize(chw, wx, wy, vertical_first).permute(1, 2, 0).to("cpu", torch.uint8)
        if torch.equal(got, want):
            return vertical_first
    return None


def exact(h: int, w: int, size: tuple[int, int], device: str | torch.device = "cpu") -> bool:
    """Whether `resize_like_pillow` reproduces the installed Pillow for [h, w] -> `size`."""
    return pillow_order(h, w, size[1], size[0], str(device)) is not None


def resize_like_pillow(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[N, H, W, 3] uint8 (any device) -> [N, 3, out_h, out_w] float64 holding 0..255, equal
    to Pillow's `resize((out_w, out_h), BICUBIC)` of each frame (where `exact(H, W, size)`).
    One frame at a time, so the float64 copy stays one frame's worth."""
    out_w, out_h = size
    n, h, w, _ = frames.shape
    dev = frames.device
    wx = (torch.from_numpy(pillow_weights(w, out_w)).to(dev, torch.float64)
          if w != out_w else None)                                       # Pillow skips a pass
    wy = (torch.from_numpy(pillow_weights(h, out_h)).to(dev, torch.float64)
          if h != out_h else None)
    vertical_first = bool(pillow_order(h, w, out_h, out_w, str(dev)))
    out = torch.empty(n, 3, out_h, out_w, dtype=torch.float64, device=dev)
    for i in range(n):
        out[i] = _resize(frames[i].permute(2, 0, 1).to(torch.float64), wx, wy, vertical_first)
    return out
