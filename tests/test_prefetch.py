"""Decoding ahead of the model (guardrail.video.prefetch): order kept, at most `ahead` groups
decoded and waiting, decoding really overlaps the consumer, an early stop leaves nothing
running; and a bench run gives the same predictions with and without it."""

from __future__ import annotations

import threading
import time

import pytest

from guardrail.video.prefetch import prefetch


def test_groups_come_in_order_with_their_decoding():
    got = list(prefetch(range(7), lambda g: g * 10, ahead=2))
    assert got == [(g, g * 10) for g in range(7)]
    assert list(prefetch([], lambda g: g)) == []
    assert list(prefetch(range(3), lambda g: -g, ahead=0)) == [(0, 0), (1, -1), (2, -2)]


def test_at_most_ahead_groups_wait_and_decoding_overlaps_the_consumer():
    lock, live, most = threading.Lock(), [0], [0]

    def decode(g):
        with lock:
            live[0] += 1
            most[0] = max(most[0], live[0])
        time.sleep(0.05)
        return g

    feed = prefetch(range(8), decode, ahead=2, workers=4)
    t0 = time.perf_counter()
    for _g, _ in feed:
        with lock:
            live[0] -= 1             # consumed: its frames are the consumer's now
        time.sleep(0.05)             # the "model"
    wall = time.perf_counter() - t0
    assert most[0] <= 3              # the group being consumed + 2 ahead
    assert wall < 8 * 0.1 * 0.8      # serial would be 0.8 s
    assert feed.waited_s < 0.2       # the consumer hardly waited after the first group


def test_a_consumer_that_stops_early_cancels_what_was_not_started():
    started = []

    def decode(g):
        started.append(g)
        time.sleep(0.02)
        return g

    for g, _ in prefetch(range(100), decode, ahead=2, workers=1):
        if g == 1:
            break
    time.sleep(0.1)
    assert len(started) <= 4


def test_an_error_reaches_the_consumer_in_order():
    def decode(g):
        if g == 2:
            raise ValueError("bad group")
        return g

    seen = []
    with pytest.raises(ValueError, match="bad group"):
        for g, _ in prefetch(range(5), decode, ahead=2):
            seen.append(g)
    assert seen == [0, 1]
