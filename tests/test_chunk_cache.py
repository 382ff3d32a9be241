from __future__ import annotations

import threading

import torch

from guardrail.chunk_cache import ChunkCache, ChunkKV, chunk_key


def _entry(n_tokens: int, fill: float = 0.0) -> ChunkKV:
    t = torch.full((1, 2, n_tokens, 4), float(fill))   # fp32 [1, H=2, n, D=4]
    return ChunkKV((t, t.clone()), (t.clone(), t.clone()))


def test_keys_depend_on_model_prefix_and_chunk():
    k = chunk_key("m", [1, 2], [3])
    assert k == chunk_key("m", [1, 2], [3])
    assert len({k, chunk_key("m2", [1, 2], [3]), chunk_key("m", [1], [3]),
                chunk_key("m", [1, 2], [4]), chunk_key("m", [1, 2], None)}) == 5


def test_lru_bounded_by_bytes():
    one = _entry(4).nbytes
    cache = ChunkCache(max_bytes=3 * one)
    for i in range(3):
        cache.put(str(i), _entry(4, i))
    assert cache.get("0") is not None           # 0 becomes most recent
    cache.put("3", _entry(4, 3))                # evicts 1, the least recently used
    assert cache.get("1") is None and cache.get("0") is not None
    assert len(cache) == 3 and cache.nbytes == 3 * one <= cache.max_bytes
    assert cache.stats.evictions == 1
    cache.put("big", _entry(400))               # larger than the whole budget: not kept
    assert cache.get("big") is None and cache.nbytes <= cache.max_bytes


def test_correct_under_threads():
    one = _entry(2).nbytes
    cache = ChunkCache(max_bytes=10 * one)
    errors = []

    def work(tid: int):
        for i in range(300):
            key = str((tid * 7 + i) % 25)
            cache.put(key, _entry(2, float(key)))
            got = cache.get(key)
            if got is not None and float(got.keys[0][0, 0, 0, 0]) != float(key):
                errors.append(key)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert cache.nbytes <= cache.max_bytes and len(cache) <= 10
    assert cache.nbytes == sum(e.nbytes for e in cache._entries.values())
