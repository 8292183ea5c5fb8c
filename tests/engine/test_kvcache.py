"""The radix prefix cache on its own: longest shared prefix, the byte bound, eviction order."""

from __future__ import annotations

import gc
import random
import weakref

import numpy as np
import pytest

from grpc_router.engines.arch_router import kvcache
from grpc_router.engines.arch_router.kvcache import PrefixCache

LAYERS = 2


def kv(ids: tuple[int, ...]) -> list[np.ndarray]:
    """A fake KV whose values name the token at each position (so slices can be checked)."""
    row = np.asarray(ids, dtype=np.float32)[None, None, :, None]
    return [np.repeat(row, 2, axis=3) for _ in range(2 * LAYERS)]


def nbytes(n: int) -> int:
    return 2 * LAYERS * n * 2 * 4


def test_the_longest_shared_prefix_wins_and_is_sliced() -> None:
    cache = PrefixCache(max_bytes=1 << 20)
    routes = (1, 2, 3, 4)
    turn1 = (*routes, 10, 11, 12, 90, 91)
    turn2 = (*routes, 10, 11, 12, 13, 14, 15, 90, 91)
    cache.put(routes, kv(routes), "route_set")
    cache.put(turn1, kv(turn1), "conversation")
    match = cache.longest(turn2)
    assert match is not None and match.entry.ids == turn1 and match.length == 7
    past = match.entry.prefix_past(match.length)
    assert past[0].shape == (1, 1, 7, 2)
    assert past[0][0, 0, :, 0].tolist() == list(turn2[:7])
    # a new conversation on the same route set: the block (or any entry through it)
    fresh = cache.longest((*routes, 20, 21))
    assert fresh is not None and fresh.length == 4
    assert cache.longest((7, 8)) is None
    assert (cache.hits, cache.misses) == (2, 1)


def test_align_and_limit_round_the_reusable_length_down() -> None:
    cache = PrefixCache(max_bytes=1 << 20)
    ids = tuple(range(1, 41))
    cache.put(ids, kv(ids), "conversation")
    m = cache.longest(ids, align=16, limit=len(ids) - 1)
    assert m is not None and m.length == 32
    m = cache.longest(ids, limit=len(ids) - 1)
    assert m is not None and m.length == 39
    assert cache.longest((1, 2, 3), align=16) is None


def test_a_prompt_an_entry_already_serves_is_not_stored_again() -> None:
    cache = PrefixCache(max_bytes=1 << 20)
    long = (1, 2, 3, 4, 5, 6)
    cache.put(long, kv(long), "conversation")
    served = cache.put((1, 2, 3), kv((1, 2, 3)), "route_set")
    assert served is not None and served.ids == long
    assert len(cache) == 1 and cache.nbytes == nbytes(6)


def test_a_served_prompt_is_not_copied(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run's KV is copied only when it is to be kept: ids an entry already serves cost no
    copy (a follow-up turn's KV is tens of MB)."""
    copies: list[int] = []
    real = kvcache._owned

    def counting(a: np.ndarray) -> np.ndarray:
        copies.append(a.size)
        return real(a)

    monkeypatch.setattr(kvcache, "_owned", counting)
    cache = PrefixCache(max_bytes=1 << 20)
    long = (1, 2, 3, 4, 5, 6)
    views = [np.concatenate([a, a], axis=2)[:, :, :6] for a in kv(long)]
    assert cache.put(long, views, "conversation") is not None
    kept = len(copies)
    assert kept == len(views)
    assert cache.put(long, views, "conversation") is not None
    assert cache.put((1, 2, 3), [v[:, :, :3] for v in views], "conversation") is not None
    assert len(copies) == kept and len(cache) == 1


def test_an_entry_owns_its_memory() -> None:
    """A view (as a run's outputs are, of onnxruntime's buffers) is kept as a copy, so the
    buffer it came from can be freed; an array that owns its memory is kept as it is."""
    cache = PrefixCache(max_bytes=1 << 20)
    ids = (1, 2, 3)
    base = [np.concatenate([a, a], axis=2) for a in kv(ids)]
    views = [b[:, :, :3] for b in base]
    entry = cache.put(ids, views, "conversation")
    assert entry is not None
    for kept, view in zip(entry.past, views, strict=True):
        assert kept.flags.owndata and kept.base is None and not np.shares_memory(kept, view)
        assert np.array_equal(kept, view)
    owned = kv((4, 5))
    entry = cache.put((4, 5), owned, "conversation")
    assert entry is not None and all(k is o for k, o in zip(entry.past, owned, strict=True))


def test_cleared_and_evicted_kv_is_freed_at_once() -> None:
    """Without waiting for Python's cycle collector: the tree's nodes and entries point at
    each other, and a cache that only let go of them would keep their KV."""
    cache = PrefixCache(max_bytes=nbytes(12))
    refs = []
    for prompt in ((1, 2, 3, 4), (1, 2, 3, 5), (1, 2, 6, 7)):
        past = kv(prompt)
        refs.append([weakref.ref(a) for a in past])
        cache.put(prompt, past, "conversation")
        del past
    gc.disable()
    try:
        cache.put((9, 9, 9, 9), kv((9, 9, 9, 9)), "conversation")  # evicts (1, 2, 3, 4)
        assert cache.evictions == 1 and all(r() is None for r in refs[0])
        assert all(r() is not None for r in refs[1] + refs[2])
        cache.clear()
        assert len(cache) == 0 and cache.nbytes == 0
        assert all(r() is None for r in refs[1] + refs[2])
    finally:
        gc.enable()
    assert cache.longest((1, 2, 3, 5)) is None


def test_leaves_go_first_and_the_bound_holds() -> None:
    cache = PrefixCache(max_bytes=nbytes(4) + 2 * nbytes(8))
    block = (1, 2, 3, 4)
    a = (*block, 5, 6, 7, 8)
    b = (*block, 9, 10, 11, 12)
    c = (*block, 13, 14, 15, 16)
    cache.put(block, kv(block), "route_set")
    cache.put(a, kv(a), "conversation")
    cache.put(b, kv(b), "conversation")
    cache.longest(a)  # a is now more recent than b, and the block is older than both
    cache.put(c, kv(c), "conversation")
    # the block is the least recently used entry, but a prefix of the others: b goes
    assert cache.evictions == 1
    assert cache.kinds() == {"route_set": 1, "conversation": 2}
    assert cache.longest(b) is not None and cache.longest(b).length == 4  # type: ignore[union-attr]
    assert cache.longest(a).length == 8  # type: ignore[union-attr]
    assert cache.nbytes <= cache.max_bytes
    oversized = tuple(range(100, 200))
    assert cache.put(oversized, kv(oversized), "conversation") is None


def test_ten_thousand_conversations_stay_inside_the_budget() -> None:
    """Interleaved sessions whose turns extend each other: the bound holds after every put,
    evicted entries leave no node behind, and what is kept is still found."""
    budget = 64 * nbytes(24)
    cache = PrefixCache(max_bytes=budget)
    rng = random.Random(7)
    block = tuple(range(1, 9))
    cache.put(block, kv(block), "route_set")
    convs: dict[int, tuple[int, ...]] = {}
    for step in range(10_000):
        key = rng.randrange(2_500) if step > 2_500 else step
        prev = convs.get(key, (*block, 1_000 + key))
        ids = (*prev, *(rng.randrange(10, 900) for _ in range(rng.randint(1, 6))))
        if len(ids) > 40:  # a new conversation
            ids = (*block, 1_000 + key, rng.randrange(10, 900))
        match = cache.longest(ids, limit=len(ids) - 1)
        assert match is None or match.entry.ids[: match.length] == ids[: match.length]
        cache.put(ids, kv(ids), "conversation")
        convs[key] = ids
        assert cache.nbytes <= budget
    assert cache.evictions > 5_000
    assert sum(e.nbytes for e in cache._lru.values()) == cache.nbytes
    assert len(cache) <= budget // nbytes(10)
    # the tree holds no node for an evicted entry
    stack, nodes = [cache._root], 0
    while stack:
        node = stack.pop()
        nodes += 1
        assert node is cache._root or node.entries
        stack.extend(node.children.values())
    assert nodes <= 1 + 2 * sum(len(e.ids) for e in cache._lru.values())
    last = convs[key]
    found = cache.longest(last)
    assert found is not None and found.length == len(last)
