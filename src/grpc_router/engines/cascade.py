"""Cascade: a fast engine answers when it is clearly sure; a slow engine decides otherwise.

"Sure" is a probability margin over every candidate, `other` included: the encoder's `other`
logit sits at the best route's threshold, so a request whose best route scores near its
threshold (p(best) close to p(other)) is uncertain and goes to the slow engine (Arch-Router,
which answers `other` itself when nothing fits), as does one torn between two routes. A request
far below every threshold is a confident `other` and stays with the fast engine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

from grpc_router.types import Decision, Engine, Message, RouteSpec


def probability_margin(scores: Mapping[str, float]) -> float:
    """Best minus second-best probability (1.0 with a single candidate)."""
    top = sorted(scores.values(), reverse=True)
    return top[0] - top[1] if len(top) > 1 else 1.0


class CascadeEngine:
    """`fast` decides when its probability margin (best minus runner-up, `other` included) is at
    least `margin`; otherwise `slow` decides. `Decision.engine` names the engine that decided."""

    def __init__(self, fast: Engine, slow: Engine, margin: float) -> None:
        if not 0.0 <= margin <= 1.0:
            raise ValueError(f"cascade margin must be in [0, 1], got {margin}")
        self._fast = fast
        self._slow = slow
        self._margin = margin

    @property
    def name(self) -> str:
        return "cascade"

    @property
    def ready(self) -> bool:
        return self._fast.ready and self._slow.ready

    @property
    def fast(self) -> Engine:
        return self._fast

    @property
    def slow(self) -> Engine:
        return self._slow

    @property
    def margin(self) -> float:
        return self._margin

    async def start(self) -> None:
        await asyncio.gather(self._fast.start(), self._slow.start())

    async def decide(
        self,
        messages: Sequence[Message],
        routes: Sequence[RouteSpec],
        *,
        full_scores: bool = True,
    ) -> Decision:
        start = time.perf_counter()
        first = await self._fast.decide(messages, routes, full_scores=True)
        fast_ms = (time.perf_counter() - start) * 1e3
        if not self.uncertain(first):
            timings = {**first.timings_ms, "cascade_fast": fast_ms, "total": fast_ms}
            return _with(first, timings, full_scores)
        second = await self._slow.decide(messages, routes, full_scores=full_scores)
        total = (time.perf_counter() - start) * 1e3
        timings = {
            **second.timings_ms,
            "cascade_fast": fast_ms,
            "cascade_slow": total - fast_ms,
            "total": total,
        }
        return _with(second, timings, full_scores)

    def uncertain(self, decision: Decision) -> bool:
        """Whether the fast engine's decision goes to the slow engine."""
        return probability_margin(decision.scores) < self._margin

    def other_thresholds(self, routes: Sequence[RouteSpec]) -> Any:
        """The fast engine's `other` thresholds for `routes` (None when it has none)."""
        fit = getattr(self._fast, "other_thresholds", None)
        return fit(routes) if callable(fit) else None

    async def prepare(self, routes: Sequence[RouteSpec]) -> Any:
        """Let the fast engine build its route-set index ahead of the first request."""
        prepare = getattr(self._fast, "prepare", None)
        return await prepare(routes) if callable(prepare) else None

    async def close(self) -> None:
        await asyncio.gather(self._fast.close(), self._slow.close())


def _with(d: Decision, timings: Mapping[str, float], full_scores: bool) -> Decision:
    return Decision(
        route=d.route,
        confidence=d.confidence,
        scores=d.scores if full_scores else {},
        engine=d.engine,
        timings_ms=timings,
        prompt_tokens=d.prompt_tokens,
        cached_tokens=d.cached_tokens,
    )
