"""The gRPC RouterService: protobuf in, plain typed objects to the core router, protobuf out."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import grpc

from grpc_router.core.router import Router
from grpc_router.dispatch.upstream import Attempt, GenerationParams, StreamDelta, StreamEnd, Usage
from grpc_router.errors import InvalidArgument
from grpc_router.observability import logs
from grpc_router.serving.interceptors import check_request_id
from grpc_router.serving.wire import route_request_from_pb, route_response_to_pb
from grpc_router.settings import AppConfig
from grpc_router.types import RouteOutcome, RouteRequest
from grpc_router.v1 import router_pb2 as pb
from grpc_router.v1 import router_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext[Any, Any]


def _params(req: pb.DispatchRequest) -> GenerationParams:
    return GenerationParams(
        temperature=req.temperature if req.HasField("temperature") else None,
        top_p=req.top_p if req.HasField("top_p") else None,
        max_tokens=req.max_tokens if req.HasField("max_tokens") else None,
        stop=tuple(req.stop),
        seed=req.seed if req.HasField("seed") else None,
        user=req.user,
    )


def _usage(u: Usage) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        total_tokens=u.total_tokens,
    )


def _attempts(attempts: tuple[Attempt, ...]) -> list[pb.Attempt]:
    return [pb.Attempt(model=a.model, error=a.error, http_status=a.http_status) for a in attempts]


class RouterServicer(pb_grpc.RouterServiceServicer):
    def __init__(self, router: Router) -> None:
        self._router = router

    def _begin(self, req: pb.RouteRequest, size: int, context: Context) -> RouteRequest:
        cfg = self._router.config
        if size > cfg.limits.max_message_bytes:
            raise InvalidArgument("request", f"{size} bytes exceed limits.max_message_bytes")
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise TimeoutError("deadline already passed")
        if req.request_id:
            limit = cfg.limits.max_request_id_chars
            logs.set_request_id(check_request_id(req.request_id, limit))
        request = route_request_from_pb(req, logs.current_request_id())
        if not request.session_id:  # a mesh hashes replicas on the header: accept it there too
            metadata = dict(context.invocation_metadata() or ())
            session_id = metadata.get(cfg.ext_proc.session_header)
            if isinstance(session_id, str) and session_id:
                request = replace(request, session_id=session_id)
        if cfg.logging.log_content:
            logs.annotate(messages=[[m.role.value, m.content] for m in request.messages])
        return request

    def _note(self, outcome: RouteOutcome) -> None:
        logs.annotate(
            route=outcome.route,
            model=outcome.model,
            confidence=round(outcome.confidence, 4),
            engine=outcome.engine,
            engine_ms=round(outcome.timings_ms.get("engine", 0.0), 3),
            fallback_reason=outcome.fallback_reason or None,
            source=outcome.source.value,
            session=outcome.session_status.value or None,
            pinned=outcome.pinned or None,
            switched=outcome.switched or None,
        )

    async def Route(self, request: pb.RouteRequest, context: Context) -> pb.RouteResponse:
        t0 = time.perf_counter()
        req = self._begin(request, request.ByteSize(), context)
        outcome = await self._router.route(req, timeout_s=context.time_remaining())
        self._note(outcome)
        total = (time.perf_counter() - t0) * 1000
        return route_response_to_pb(outcome, req.request_id, total)

    async def Dispatch(self, request: pb.DispatchRequest, context: Context) -> pb.DispatchResponse:
        t0 = time.perf_counter()
        req = self._begin(request.route, request.ByteSize(), context)
        result = await self._router.dispatch(
            req, _params(request), timeout_s=context.time_remaining()
        )
        c = result.completion
        self._note(result.outcome)
        logs.annotate(
            answered_by=c.answered_by,
            upstream_ms=round(c.upstream_ms, 3),
            failed_models=[a.model for a in c.failed_attempts] or None,
        )
        decision = route_response_to_pb(
            result.outcome, req.request_id, (time.perf_counter() - t0) * 1000
        )
        decision.timings.upstream_ms = c.upstream_ms
        return pb.DispatchResponse(
            decision=decision,
            content=c.content,
            finish_reason=c.finish_reason,
            usage=_usage(c.usage),
            answered_by=c.answered_by,
            failed_attempts=_attempts(c.failed_attempts),
        )

    async def DispatchStream(
        self, request: pb.DispatchRequest, context: Context
    ) -> AsyncIterator[pb.DispatchChunk]:
        t0 = time.perf_counter()
        req = self._begin(request.route, request.ByteSize(), context)
        events = self._router.dispatch_stream(
            req, _params(request), timeout_s=context.time_remaining()
        )
        async for event in events:
            if isinstance(event, StreamDelta):
                yield pb.DispatchChunk(delta=event.text)
            elif isinstance(event, StreamEnd):
                logs.annotate(
                    answered_by=event.answered_by,
                    upstream_ms=round(event.upstream_ms, 3),
                    failed_models=[a.model for a in event.failed_attempts] or None,
                )
                yield pb.DispatchChunk(
                    end=pb.StreamEnd(
                        finish_reason=event.finish_reason,
                        usage=_usage(event.usage),
                        answered_by=event.answered_by,
                        failed_attempts=_attempts(event.failed_attempts),
                        upstream_ms=event.upstream_ms,
                    )
                )
            else:
                self._note(event)
                total = (time.perf_counter() - t0) * 1000
                yield pb.DispatchChunk(decision=route_response_to_pb(event, req.request_id, total))

    async def ListRoutes(
        self, request: pb.ListRoutesRequest, context: Context
    ) -> pb.ListRoutesResponse:
        import asyncio

        cfg = self._router.config
        response = list_routes_pb(cfg, self._router.engine.name)
        # The encoder's `other` thresholds for the configured route set (fitted when its index
        # is built, at start and on reload); engines without thresholds leave the fields unset.
        thresholds = getattr(self._router.engine, "other_thresholds", None)
        if not callable(thresholds):
            return response
        try:
            fit = await asyncio.to_thread(thresholds, cfg.route_specs())
        except Exception as e:  # not started yet, or the route set failed: list without them
            logs.annotate(other_thresholds=f"unavailable: {type(e).__name__}")
            return response
        if fit is None:
            return response
        response.other_threshold_mode = fit.mode
        response.other_threshold_source = fit.source
        if fit.threshold is not None:
            response.other_threshold = fit.threshold
        for route, value, examples in zip(
            response.routes, fit.route_thresholds, fit.route_examples, strict=False
        ):
            route.other_threshold = value
            route.other_threshold_examples = examples
        return response


def list_routes_pb(cfg: AppConfig, engine: str) -> pb.ListRoutesResponse:
    return pb.ListRoutesResponse(
        routes=[
            pb.ConfiguredRoute(
                name=r.name, description=r.description, models=r.models, examples=r.examples
            )
            for r in cfg.routes
        ],
        models=[
            pb.ConfiguredModel(key=k, model=m.model, base_url=m.base_url)
            for k, m in cfg.models.items()
        ],
        default_route=cfg.default_route,
        default_model=cfg.default_model,
        engine=engine,
    )
