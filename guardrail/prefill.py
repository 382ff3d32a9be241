"""The prefill step of a batch: the cached policy prefix (`parallel_cached`) and the prompt's
forward pass, with policy-aware pruning of video tokens before or after it."""

from __future__ import annotations

import torch

from guardrail.adapters.attention import attention_rows
from guardrail.adapters.base import ModelAdapter
from guardrail.chunk_cache import ChunkCache, ChunkKV, chunk_key
from guardrail.kvcache import Tensors, layers
from guardrail.layout import HOST, Layout
from guardrail.pruning import (
    PruningConfig,
    attention_from_rows,
    attention_to_columns,
    embedding_similarity,
    select_tokens,
)
from guardrail.runner import Batch, Item, batch_from_prefix


def prefix_kv(adapter: ModelAdapter, store: ChunkCache, item: Item) -> Tensors:
    """KV of S + every policy chunk for `item`'s layout, from the chunk cache `store`, computing
    what is missing. S and each chunk are entries of their own: a chunk's KV depends only on the
    model, S and the chunk (PEPE), so one policy set's edit recomputes only the edited chunk."""
    lay = item.layout
    model_id = f"{adapter.name}|{adapter.dtype}|{adapter.device}|{id(adapter.model)}"
    s_span = lay.span("S")
    s_ids = lay.ids[s_span].tolist()
    spans = _chunk_spans(lay)
    s_key = chunk_key(model_id, s_ids, None)
    s_kv = store.get(s_key)
    if s_kv is None:
        b = Batch(adapter, [item])
        b.step([torch.arange(s_span.start, s_span.stop, device=HOST)])
        s_kv = _entry(layers(b.cache), slice(None))
        store.put(s_key, s_kv)
    keys = [chunk_key(model_id, s_ids, lay.ids[sp].tolist()) for sp in spans]
    entries = [store.get(k) for k in keys]
    missing = [i for i, e in enumerate(entries) if e is None]
    if missing:
        b = batch_from_prefix(adapter, [item], _tensors(s_kv), s_span.stop)
        b.step([torch.cat([torch.arange(spans[i].start, spans[i].stop, device=HOST)
                           for i in missing])])
        offset = s_span.stop
        for i in missing:
            n = spans[i].stop - spans[i].start
            entries[i] = _entry(layers(b.cache), slice(offset, offset + n))
            store.put(keys[i], entries[i])
            offset += n
    return [(torch.cat([s_kv.keys[li]] + [e.keys[li] for e in entries], dim=-2),
             torch.cat([s_kv.values[li]] + [e.values[li] for e in entries], dim=-2))
            for li in range(len(s_kv.keys))]


def _entry(tensors: Tensors, part: slice) -> ChunkKV:
    return ChunkKV(tuple(k[:, :, part].clone() for k, _ in tensors),
                   tuple(v[:, :, part].clone() for _, v in tensors))


def _tensors(entry: ChunkKV) -> Tensors:
    return list(zip(entry.keys, entry.values, strict=True))


def _chunk_spans(lay: Layout) -> list[slice]:
    return [lay.span(s.name) for s in lay.segments if s.name.startswith("P")]


def prefill(batch: Batch, start: int, cfg: PruningConfig) -> list[int]:
    """Run every row's prompt from layout index `start` up to its probes, pruning video tokens
    when `cfg`'s keep ratio is below 1. Returns the video tokens kept per row."""
    items, adapter = batch.items, batch.adapter
    todo = [torch.arange(start, it.probe_start, device=HOST) for it in items]
    totals = [int(it.visual.sum()) for it in items]
    if not cfg.active:
        batch.step(todo)
        return totals
    if cfg.mode == "pre_prefill":
        dropped = _dropped(items, [_similarity(adapter, it) for it in items], cfg.keep_ratio)
        batch.step([t[~torch.isin(t, d)] for t, d in zip(todo, dropped, strict=True)])
        return [n - int(d.numel()) for n, d in zip(totals, dropped, strict=True)]
    relevance: list[torch.Tensor | None] = [None] * len(items)

    def capture(query, key, mask, scaling, keys):                      # keys [B, K] slots
        for b, it in enumerate(items):
            relevance[b] = _attention_relevance(it, query[b], key[b], mask[b], scaling,
                                                todo[b], keys[b])

    batch.step(todo, capture=(cfg.layer, capture))
    dropped = _dropped(items, relevance, cfg.keep_ratio)
    batch.keep([(~torch.isin(s, d) & (s >= 0)).nonzero().flatten()
                for s, d in zip(batch.slots, dropped, strict=True)])
    return [n - int(d.numel()) for n, d in zip(totals, dropped, strict=True)]


def _dropped(items: list[Item], relevance: list[torch.Tensor], keep_ratio: float
             ) -> list[torch.Tensor]:
    """Layout indices of each row's video tokens pruned away. The kept sets are chosen on the
    relevance's device, row by row, and come to the host in one copy (not a sync per row)."""
    kept = [select_tokens(rel, keep_ratio) for rel in relevance]           # on the device
    sizes = [int(k.numel()) for k in kept]                                # shapes: no sync
    on_host = torch.cat(kept).to(HOST).split(sizes)
    out = []
    for it, keep_idx in zip(items, on_host, strict=True):
        video = it.visual.nonzero().flatten()                                           # [N]
        keep = torch.zeros(video.numel(), dtype=torch.bool, device=HOST)
        keep[keep_idx] = True
        out.append(video[~keep])
    return out


def _similarity(adapter: ModelAdapter, item: Item) -> torch.Tensor:
    policies = [adapter.embed(item.layout.ids[sp]) for sp in _chunk_spans(item.layout)]
    return embedding_similarity(item.feats.embeds, policies)           # [m, N] on the device


def _attention_relevance(item: Item, query, key, mask, scaling, new: torch.Tensor,
                         keys: torch.Tensor) -> torch.Tensor:
    """[m, N] relevance of each video token to each policy from one layer's attention (see
    guardrail.pruning for the two directions)."""
    lay = item.layout
    q_pos = _positions(new, lay.length)                               # layout idx -> query row
    k_pos = _positions(keys, lay.length)                              # layout idx -> key column
    video = item.visual.nonzero().flatten()
    chunks = [torch.arange(sp.start, sp.stop, device=HOST) for sp in _chunk_spans(lay)]
    dev = query.device
    if lay.span("V").start < lay.span("P0").start:                     # policies see the video
        rows = torch.cat([q_pos[c] for c in chunks])
        w = attention_rows(query, key, mask, scaling, rows)            # [H, r, K] on device
        bounds = torch.tensor([0] + [c.numel() for c in chunks], device=HOST).cumsum(0)
        groups = [torch.arange(bounds[i], bounds[i + 1], device=dev) for i in range(len(chunks))]
        rel = attention_to_columns(w, groups, k_pos[video].to(dev))
    else:
        rows = q_pos[video]
        w = attention_rows(query, key, mask, scaling, rows)
        rel = attention_from_rows(w, torch.arange(rows.numel(), device=dev),
                                  [k_pos[c].to(dev) for c in chunks])
    return rel                                                         # [m, N] on the device


def _positions(indices: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of an index list: for each layout token, its position in `indices` (-1 if absent)."""
    pos = torch.full((length,), -1, dtype=torch.long, device=HOST)
    real = indices >= 0
    pos[indices[real]] = real.nonzero().flatten()
    return pos
