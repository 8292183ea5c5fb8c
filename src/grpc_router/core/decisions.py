"""The decision cache: a routing-relevant conversation decided once is not decided again.

Keyed by the digest of the routing view under a route set, so every call of an agent loop
that only adds tool traffic, and every retry, reuses the decision of its user turn. Decisions
depend only on the view, the route set and the engine, which does not change while the
process runs; policy (threshold, fallbacks, sessions) is applied afresh to each call.
"""

from __future__ import annotations

from collections import OrderedDict

from grpc_router.types import Decision


class DecisionCache:
    """Least-recently-used map from a view key to the engine's decision; asyncio-only."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[str, Decision] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str, *, need_scores: bool) -> Decision | None:
        """The decision stored under `key`; one without scores does not serve a call that
        wants them."""
        found = self._items.get(key)
        if found is None or (need_scores and not found.scores):
            return None
        self._items.move_to_end(key)
        return found

    def put(self, key: str, decision: Decision) -> None:
        if self.max_entries <= 0:
            return
        self._items[key] = decision
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)
