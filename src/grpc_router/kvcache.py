"""Prefix KV cache: the key/value tensors of a route set's constant prompt head, LRU by bytes."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from grpc_router.runtime import KVTensor, kv_nbytes, on_host


@dataclass(frozen=True, slots=True)
class PrefixKV:
    ids: tuple[int, ...]
    """The tokens the KV was computed from; a prompt reuses it only if it starts with them."""
    past: list[KVTensor]
    """Per layer key then value, [1, kv_heads, len(ids), head_dim]; on the session's device
    when it keeps the KV there."""

    @property
    def nbytes(self) -> int:
        return sum(kv_nbytes(a) for a in self.past)


class PrefixCache:
    """Least-recently-used map from a route-set key to its PrefixKV, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, PrefixKV] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str, ids: tuple[int, ...]) -> PrefixKV | None:
        with self._lock:
            item = self._items.get(key)
            if item is None or item.ids != ids:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def put(self, key: str, item: PrefixKV) -> None:
        """Store `item`; one larger than the whole bound is not stored."""
        size = item.nbytes
        if size > self.max_bytes:
            return
        for a in item.past:
            if isinstance(a, np.ndarray):
                a.setflags(write=False)  # shared by every request of the route set
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            while self._items and self._bytes + size > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.nbytes
            self._items[key] = item
            self._bytes += size

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


def stack_past(items: list[list[KVTensor]]) -> list[KVTensor]:
    """Concatenate several equally long pasts along the batch axis (one is used as it is: the
    graph only reads its past; several are joined on the host)."""
    if len(items) == 1:
        return list(items[0])
    return [np.concatenate(layer, axis=0) for layer in zip(*map(on_host, items), strict=True)]
