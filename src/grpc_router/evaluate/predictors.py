"""Predictors: answer one eval case, in process or over gRPC, and time it.

In process, cases go through `grpc_router.core.router.Router` (the service's own code path, so
the eval measures what the service does); with a target they go over gRPC to a running server.
Either way a predictor is handed to a `run` callback that feeds it every case, so the engine or
channel lives exactly as long as the run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpc_router.evaluate.dataset import EvalCase
from grpc_router.types import RouteRequest, RouteSpec


@dataclass(frozen=True, slots=True)
class Prediction:
    """What the router answered for one case, and how long it took."""

    route: str
    """The engine's answer before any fallback (OTHER_ROUTE included); "" on failure."""
    engine: str
    latency_ms: float
    error: str = ""


Predictor = Callable[[EvalCase], Awaitable[Prediction]]
Run = Callable[[Predictor], Awaitable[None]]
"""Feeds every case to the predictor it is given."""


def other_fit_summary(engine: Any, routes: Sequence[RouteSpec]) -> dict[str, Any] | None:
    """The `other` thresholds an engine keeps for `routes` (the encoder's, directly or in a
    cascade), as the fit's log line has them; None for engines without."""
    thresholds = getattr(engine, "other_thresholds", None)
    if not callable(thresholds):
        return None
    fit = thresholds(routes)
    if fit is None:
        return None
    summary: dict[str, Any] = fit.summary([r.name for r in routes])
    return summary


def _eval_config(routes: Sequence[RouteSpec], engine: Any) -> Any:
    """An AppConfig holding the eval's routes and engine, with a placeholder model: the Router
    needs one per route, but eval only routes and never calls it."""
    from grpc_router.settings import AppConfig

    return AppConfig.model_validate(
        {
            "routes": [
                {
                    "name": r.name,
                    "description": r.description or r.name,
                    "models": ["eval"],
                    "examples": list(r.examples),
                }
                for r in routes
            ],
            # Never called: eval only routes.
            "models": {"eval": {"base_url": "http://127.0.0.1:9/v1", "model": "eval"}},
            "default_route": "eval_fallback",
            "default_model": "eval",
            "engine": engine,
            "metrics": {"port": None},
        }
    )


async def in_process(
    routes: Sequence[RouteSpec], engine_cfg: Any, run: Run
) -> dict[str, Any] | None:
    """Run the cases in process; returns the engine's `other` thresholds for the routes."""
    from grpc_router.core.router import Router
    from grpc_router.engines.selection import build_engine

    engine = build_engine(engine_cfg, base_dir=Path.cwd())
    await engine.start()
    router = Router(_eval_config(routes, engine_cfg), engine)

    async def predict(case: EvalCase) -> Prediction:
        start = time.perf_counter()
        try:
            outcome = await router.route(RouteRequest(case.messages))
        except Exception as e:  # reported per case; the run goes on
            return Prediction("", "", 0.0, f"{type(e).__name__}: {e}")
        latency = (time.perf_counter() - start) * 1e3
        if outcome.decision is None:
            return Prediction("", "", latency, outcome.fallback_reason or "engine failed")
        return Prediction(outcome.decision.route, outcome.engine, latency)

    try:
        await run(predict)
        return await asyncio.to_thread(other_fit_summary, engine, routes)
    finally:
        await router.close()
        await engine.close()


async def over_grpc(target: str, routes: Sequence[RouteSpec], run: Run) -> None:
    """Run the cases against the server at `target` (host:port), the routes sent with each."""
    import grpc

    from grpc_router.serving.wire import messages_to_pb, routes_to_pb
    from grpc_router.v1 import router_pb2, router_pb2_grpc

    defs = routes_to_pb(routes)
    async with grpc.aio.insecure_channel(target) as channel:
        # The async stub type exists only in the .pyi; at runtime the one class serves both.
        stub: router_pb2_grpc.RouterServiceAsyncStub = router_pb2_grpc.RouterServiceStub(channel)

        async def predict(case: EvalCase) -> Prediction:
            request = router_pb2.RouteRequest(
                messages=messages_to_pb(case.messages),
                routes=defs,
            )
            start = time.perf_counter()
            try:
                reply = await stub.Route(request, timeout=60)
            except grpc.aio.AioRpcError as e:
                return Prediction("", "", 0.0, f"{e.code().name}: {e.details()}")
            latency = (time.perf_counter() - start) * 1e3
            if not reply.engine_route:
                return Prediction("", "", latency, reply.fallback_detail or "engine failed")
            return Prediction(reply.engine_route, reply.engine, latency)

        await run(predict)
