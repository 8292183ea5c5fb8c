"""Prefix KV cache: a radix tree over token ids, LRU by bytes.

Every prompt the engine prefills can be kept with its KV. A later prompt reuses the KV of the
longest token prefix it shares with any kept prompt: a follow-up turn of a conversation shares
everything up to the end of the previous turn, and a new conversation shares its route set's
block. Only the new tokens are prefilled.

Entries hold the KV of a whole token sequence. A prefix of an entry's KV is the KV of that
prefix (attention is causal), so a lookup that ends inside an entry uses a slice of it. The
tree finds, for a prompt, the entry that shares the most leading tokens with it, in time
linear in the prompt. One byte budget bounds every entry; eviction takes the least recently
used leaf first: an entry that is a prefix of another (a route set's block, a conversation's
earlier turn) goes only once no leaf is left.

This follows SGLang's RadixAttention and vLLM's automatic prefix caching, at the granularity
of prompts rather than pages.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from grpc_router.engines.arch_router.runtime import KVTensor, kv_length, kv_nbytes, on_host

EntryKind = Literal["route_set", "conversation"]


@dataclass(slots=True, eq=False)
class KVEntry:
    """The KV of one token sequence."""

    ids: tuple[int, ...]
    past: list[KVTensor]
    """Per layer key then value, [1, kv_heads, at least len(ids), head_dim] (positions past
    len(ids), a route trie's, are never read); on the session's device when it keeps the KV
    there."""
    kind: EntryKind
    nbytes: int = 0
    node: _Node | None = field(default=None, repr=False)
    """Where its ids end in the tree."""

    def prefix_past(self, length: int) -> list[KVTensor]:
        """The KV of its first `length` tokens: the arrays themselves when they hold exactly
        that many, else host slices (views)."""
        if kv_length(self.past[0]) == length:
            return list(self.past)
        return [p[:, :, :length] for p in on_host(self.past)]


@dataclass(slots=True, eq=False)
class _Node:
    edge: tuple[int, ...]
    """Tokens from the parent to this node."""
    parent: _Node | None
    children: dict[int, _Node] = field(default_factory=dict)
    entries: dict[int, KVEntry] = field(default_factory=dict)
    """Every entry whose ids pass through or end at this node, by id."""


@dataclass(frozen=True, slots=True)
class Match:
    entry: KVEntry
    length: int
    """Leading tokens the prompt shares with `entry` that may be reused."""


class PrefixCache:
    """Token-prefix index of kept KV, bounded in bytes; thread-safe."""

    def __init__(self, max_bytes: int, *, on_evict: Callable[[], None] | None = None) -> None:
        self.max_bytes = max_bytes
        self._on_evict = on_evict
        self._root = _Node((), None)
        self._lru: OrderedDict[int, KVEntry] = OrderedDict()
        self._ids = itertools.count()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._lru)

    def longest(
        self, ids: Sequence[int], *, align: int = 1, limit: int | None = None
    ) -> Match | None:
        """The kept entry sharing the most leading tokens with `ids`, and how many of them may
        be reused: at most `limit`, rounded down to a multiple of `align`. None if none."""
        with self._lock:
            node, matched = self._walk(ids)
            cap = matched if limit is None else min(matched, limit)
            length = cap // align * align
            if node is None or length <= 0:
                self.misses += 1
                return None
            key, entry = next(reversed(node.entries.items()))
            self._lru.move_to_end(key)
            self.hits += 1
            return Match(entry, length)

    def put(self, ids: Sequence[int], past: list[KVTensor], kind: EntryKind) -> KVEntry | None:
        """Keep `past` (whose first len(ids) positions are their KV) as the KV of `ids`,
        evicting as needed. Nothing is stored when a kept
        entry already starts with `ids` (it serves them), or when `past` alone is over the
        budget. Returns the entry that now serves `ids`, if any."""
        key_ids = tuple(ids)
        size = sum(kv_nbytes(a) for a in past)
        with self._lock:
            served = self._serving(key_ids)
        if served is not None or size > self.max_bytes:
            return served
        # The copy (tens of MB for a follow-up turn) is made outside the lock, and only for
        # ids no entry serves; another thread may have kept them meanwhile, so look again.
        past = [_owned(a) for a in past]
        with self._lock:
            served = self._serving(key_ids)
            if served is not None:
                return served
            for a in past:
                if isinstance(a, np.ndarray):
                    a.setflags(write=False)  # shared by every prompt that starts with these ids
            while self._lru and self._bytes + size > self.max_bytes:
                self._evict_one()
            entry = KVEntry(key_ids, list(past), kind, size)
            key = next(self._ids)
            self._insert(key, entry)
            self._lru[key] = entry
            self._bytes += size
            return entry

    def _serving(self, key_ids: tuple[int, ...]) -> KVEntry | None:
        """The newest entry that starts with `key_ids` (marked recently used), if any; under
        the lock."""
        node, matched = self._walk(key_ids)
        if node is None or matched != len(key_ids):
            return None
        key, entry = next(reversed(node.entries.items()))
        self._lru.move_to_end(key)
        return entry

    def clear(self) -> None:
        """Drop every entry. The tree's links are cut too: nodes and entries point at each
        other, and a tree merely let go of would keep its KV until Python's cycle collector
        next ran a full pass."""
        with self._lock:
            stack = [self._root]
            while stack:
                node = stack.pop()
                stack.extend(node.children.values())
                node.children.clear()
                node.entries.clear()
                node.parent = None
            for entry in self._lru.values():
                entry.node = None
            self._root = _Node((), None)
            self._lru.clear()
            self._bytes = 0

    def kinds(self) -> dict[str, int]:
        """Entries by kind (for tests and reports)."""
        with self._lock:
            out: dict[str, int] = {}
            for entry in self._lru.values():
                out[entry.kind] = out.get(entry.kind, 0) + 1
            return out

    # -- the tree -------------------------------------------------------------------------

    def _walk(self, ids: Sequence[int]) -> tuple[_Node | None, int]:
        """The deepest node whose entries share the most leading tokens with `ids`, and how
        many they share (a node reached partway along its edge counts)."""
        node, matched, best = self._root, 0, None
        while matched < len(ids):
            child = node.children.get(ids[matched])
            if child is None:
                break
            edge = child.edge
            k = 1
            while k < len(edge) and matched + k < len(ids) and edge[k] == ids[matched + k]:
                k += 1
            matched += k
            best = child
            if k < len(edge):
                break
            node = child
        return best, matched

    def _insert(self, key: int, entry: KVEntry) -> None:
        ids = entry.ids
        node, at = self._root, 0
        node.entries[key] = entry
        while at < len(ids):
            child = node.children.get(ids[at])
            if child is None:
                child = _Node(ids[at:], node)
                node.children[ids[at]] = child
            else:
                edge = child.edge
                k = 1
                while k < len(edge) and at + k < len(ids) and edge[k] == ids[at + k]:
                    k += 1
                if k < len(edge):
                    child = self._split(child, k)
            child.entries[key] = entry
            at += len(child.edge)
            node = child
        entry.node = node

    @staticmethod
    def _split(child: _Node, k: int) -> _Node:
        """Cut `child`'s edge after k tokens; returns the new middle node."""
        parent = child.parent
        assert parent is not None
        middle = _Node(child.edge[:k], parent, entries=dict(child.entries))
        parent.children[child.edge[0]] = middle
        child.edge = child.edge[k:]
        child.parent = middle
        middle.children[child.edge[0]] = child
        return middle

    def _evict_one(self) -> None:
        """Drop the least recently used leaf entry, or the least recently used entry when
        every one is a prefix of another."""
        victim = next(iter(self._lru))
        for key, entry in self._lru.items():
            if entry.node is not None and len(entry.node.entries) == 1:
                victim = key
                break
        entry = self._lru.pop(victim)
        self._bytes -= entry.nbytes
        self.evictions += 1
        if self._on_evict is not None:
            self._on_evict()
        node = entry.node
        while node is not None:
            node.entries.pop(victim, None)
            parent = node.parent
            if parent is not None and not node.entries:
                parent.children.pop(node.edge[0], None)
            node = parent
        entry.node = None


def stack_past(items: list[list[KVTensor]]) -> list[KVTensor]:
    """Concatenate several equally long pasts along the batch axis (one is used as it is: the
    graph only reads its past; several are joined on the host)."""
    if len(items) == 1:
        return list(items[0])
    return [np.concatenate(layer, axis=0) for layer in zip(*map(on_host, items), strict=True)]


def _owned(a: KVTensor) -> KVTensor:
    """`a` in memory of its own. A run's outputs are views of onnxruntime's buffers, which come
    from its arena: an entry kept there would pin arena chunks that the arena never gives back,
    and interleaved with each run's scratch they make it grow run after run. A device tensor
    stays where it is."""
    if isinstance(a, np.ndarray) and not a.flags.owndata:
        return np.array(a, order="C", copy=True)
    return a
