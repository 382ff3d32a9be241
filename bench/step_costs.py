"""Per-clip and per-step costs behind the CPU speed table (imported by bench/speed_cpu.py):
vision attention calls per clip, and host work per step on attention masks.

Vision attention: `torch.nn.functional.scaled_dot_product_attention` calls during one visual
encoder forward, with the engine's one-call-per-block attention and with transformers' own
per-window loop (the engine's forward taken off the modules for that row), for 1 clip and for a
batch of 8.

Masks: one prefill step of 8 rows under the `parallel` layout (the largest mask a batch builds),
uniform rows (8 equal videos) and ragged ones (8- and 4-frame videos alternating):
- `host dense [B, Q, K]`: the runner before the GPU rewrite: a [Q, K] visibility matrix per row
  on the host from the layout (`layout.visibility`, the same rule), stacked, made additive in
  the model dtype, then copied to the device (bytes = what that copy moves; rows that all see
  alike sent one row);
- `device vectors`: the runner now: the host pads the step's indices and checks whether rows
  are alike or causal; the device gathers per-token vectors and builds the mask from them.
  Host-to-device bytes = the step's index matrix.
On this CPU "device" work is CPU work too, so both columns are CPU time; on a GPU only the
host column stays on the host.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from guardrail.layout import HOST, additive_mask, visibility
from guardrail.runner import Batch, Item, pad_rows


class _CountAttention(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func is F.scaled_dot_product_attention
        return func(*args, **(kwargs or {}))


@contextmanager
def transformers_vision(model) -> None:
    """transformers' own vision attention forward, while the block runs."""
    saved = {m: m.__dict__.pop("forward") for m in model.model.visual.modules()
             if "forward" in m.__dict__}
    try:
        yield
    finally:
        for m, fwd in saved.items():
            m.forward = fwd


def _best_ms(fn: Callable[[], object], repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def vision_rows(engine, videos) -> list[str]:
    adapter, model = engine.adapter, engine.adapter.model
    rows = []
    for n in (1, 8):
        inputs = [adapter.video_inputs(v.clips[0]) for v in videos[:n]]
        calls, ms = {}, {}
        for name, ctx in (("transformers loop", transformers_vision(model)),
                          ("one call per block", _nothing())):
            with ctx:
                with _CountAttention() as mode:
                    adapter.visual_features_many(inputs)
                calls[name] = mode.calls
                ms[name] = _best_ms(lambda x=inputs: adapter.visual_features_many(x), 3)
        base = ms["transformers loop"]
        for name in calls:
            rows.append(f"| vision attention, {n} clip(s): {name} | {calls[name]:,} "
                        f"| {calls[name] / n:,.1f} | {ms[name] / n:,.0f} | {base / ms[name]:.2f} |")
    return rows


@contextmanager
def _nothing():
    yield


def _items(engine, videos) -> list[Item]:
    inputs = [engine.adapter.video_inputs(v.clips[0]) for v in videos]
    feats = engine.adapter.visual_features_many(inputs)
    return [Item(*engine.layout(v), f) for v, f in zip(inputs, feats, strict=True)]


def _old_host_mask(items: list[Item], todo: list[torch.Tensor], dtype) -> torch.Tensor:
    idx = pad_rows(todo)                                           # [B, n]; keys = queries here
    alike = all(torch.equal(it.layout.group_of, items[0].layout.group_of)
                and torch.equal(it.layout.segment_of, items[0].layout.segment_of)
                and torch.equal(i, idx[0]) for it, i in zip(items, idx, strict=True))
    rows = items[:1] if alike else items
    dense = torch.stack([visibility(it.layout, i, i) for it, i in zip(rows, idx[:len(rows)],
                                                                     strict=True)])
    return additive_mask(dense, dtype)


def _new_step_plan(batch: Batch, todo: list[torch.Tensor]):
    """The host half of `Batch.step` for a first step, then the device half (the mask)."""
    idx = pad_rows(todo)
    t = batch._tables
    padded = bool((idx < 0).any())
    q = idx.to(batch.device, non_blocking=True)
    alike = t.alike and not padded and all(torch.equal(idx[b], idx[0])
                                           for b in range(1, len(todo)))
    solo = bool(t.solo.gather(1, idx.clamp(min=0)).all())
    return q, alike, solo and not padded, idx


def _mask_rows(eng, name: str, vids) -> list[str]:
    dtype = eng.adapter.dtype
    items = _items(eng, vids)
    todo = [torch.arange(0, it.probe_start, device=HOST) for it in items]
    batch = Batch(eng.adapter, items)

    def old():
        return _old_host_mask(items, todo, dtype)

    def new_host():
        return _new_step_plan(batch, todo)

    def new_device():
        q, alike, causal, _ = _new_step_plan(batch, todo)
        vis = batch._visibility(q[:1] if alike else q, q[:1] if alike else q)
        return None if causal else eng.adapter._mask(vis, len(items))

    old_ms, host_ms, total_ms = _best_ms(old), _best_ms(new_host), _best_ms(new_device)
    mask = old()
    old_bytes = mask.numel() * torch.finfo(dtype).bits // 8
    idx = new_host()[3]
    shape = "x".join(str(s) for s in mask.shape[-2:])
    return [f"| masks, 8 {name} rows ({shape}): host dense [B, Q, K] | {old_ms:,.1f} "
            f"| - | {old_bytes / 1e6:,.1f} MB |",
            f"| masks, 8 {name} rows: device vectors | {host_ms:,.2f} "
            f"| {total_ms - host_ms:,.1f} | {idx.numel() * 8 / 1e3:,.1f} kB |"]


def mask_rows(engine, uniform, ragged) -> list[str]:
    eng = engine.with_config(layout="parallel")
    return [*_mask_rows(eng, "uniform", uniform), *_mask_rows(eng, "ragged", ragged)]


def render(engine, uniform, ragged) -> str:
    vision = vision_rows(engine, uniform)
    masks = mask_rows(engine, uniform, ragged)
    return "\n".join([
        "| vision encoder | sdpa calls | calls / clip | encoder ms / clip | x loop |",
        "|---|---:|---:|---:|---:|", *vision, "",
        "| one prefill step | host ms | device ms | host-to-device copy |",
        "|---|---:|---:|---:|", *masks]) + "\n"
