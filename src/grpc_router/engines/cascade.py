"""Cascade: a fast engine answers when it is clearly sure; a slow engine decides otherwise."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence

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
        margin = probability_margin(first.scores)
        if margin >= self._margin:
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
