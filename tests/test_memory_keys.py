"""The memory backend's chunked sorted key list against a plain sorted list."""

from __future__ import annotations

import random

from dgen.backends.memory import SortedKeys


def test_sorted_keys_match_a_sorted_list() -> None:
    rng = random.Random(7)
    keys, model = SortedKeys(), set()
    for step in range(20_000):
        key = b"%05d" % rng.randrange(5_000)
        if key in model and rng.random() < 0.4:
            keys.remove(key)
            model.discard(key)
        elif key not in model:
            keys.insert(key)
            model.add(key)
        if step % 500 == 0:
            ordered = sorted(model)
            assert keys.between(b"", b"\xff") == ordered
            a, b = sorted((b"%05d" % rng.randrange(5_000), b"%05d" % rng.randrange(5_000)))
            inside = [k for k in ordered if a <= k < b]
            limit = rng.choice([0, 1, 7, 600])
            assert keys.between(a, b, limit) == (inside[:limit] if limit else inside)
            backwards = inside[::-1]
            assert keys.between(a, b, limit, reverse=True) == (
                backwards[:limit] if limit else backwards
            )
    assert len(keys) == len(model)
    assert len(keys._chunks) > 1  # the test did exercise more than one chunk
    assert keys.between(b"b", b"a") == []
