"""A bounded, thread-safe LRU of policy-chunk KV, shared across requests (see
`parallel_cached`).

Under `parallel_cached` the KV of the system prefix and of each policy chunk depends only on the
model, the prefix and the chunk's tokens (the chunks start at the same position and never see
the video), so it is computed once and reused. Entries are keyed by a hash of (model identity,
prefix ids, chunk ids) and hold per-layer key/value tensors [1, H_kv, L, D]; the cache evicts
least-recently-used entries to stay under `max_bytes`.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ChunkKV:
    keys: tuple[torch.Tensor, ...]     # per layer [1, H_kv, L, D]
    values: tuple[torch.Tensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    @property
    def length(self) -> int:
        return int(self.keys[0].shape[-2])


def chunk_key(model_id: str, prefix_ids: list[int], chunk_ids: list[int] | None) -> str:
    """Cache key of the prefix itself (chunk_ids None) or of one chunk after that prefix."""
    h = hashlib.sha256()
    h.update(model_id.encode())
    h.update(b"\0prefix\0" + np.asarray(prefix_ids, dtype=np.int64).tobytes())
    if chunk_ids is not None:
        h.update(b"\0chunk\0" + np.asarray(chunk_ids, dtype=np.int64).tobytes())
    return h.hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class ChunkCache:
    """LRU by bytes. `get` / `put` are safe to call from several threads."""

    def __init__(self, max_bytes: int = 1 << 30):
        assert max_bytes > 0, "max_bytes must be positive"
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, ChunkKV] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats = CacheStats()

    def get(self, key: str) -> ChunkKV | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return entry

    def put(self, key: str, entry: ChunkKV) -> None:
        """Insert (or refresh) an entry; one larger than the whole budget is not kept."""
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            if entry.nbytes > self.max_bytes:
                return
            self._entries[key] = entry
            self._bytes += entry.nbytes
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
                self.stats.evictions += 1

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
