"""The router core: validate a request, ask the engine, apply policy, map the route to models.

Transport-agnostic: the gRPC servicer and the Envoy ext_proc servicer both call `Router.route`.
The session policy (sticky, pin) lives in `grpc_router.core.session_policy`; the Router only
asks it before and after deciding.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace

from opentelemetry import trace

from grpc_router.core.conversation import routing_view, view_key
from grpc_router.core.decisions import DecisionCache
from grpc_router.core.session_policy import SessionPolicy, SessionTurn
from grpc_router.core.sessions import SessionStore
from grpc_router.core.validation import validate_params, validate_request
from grpc_router.dispatch.upstream import (
    Completion,
    Dispatcher,
    GenerationParams,
    StreamDelta,
    StreamEnd,
)
from grpc_router.errors import EngineUnavailable, InvalidArgument, Overloaded
from grpc_router.observability import metrics, tracing
from grpc_router.settings import AppConfig, ModelConfig
from grpc_router.types import (
    OTHER_ROUTE,
    Decision,
    DecisionSource,
    Engine,
    FallbackReason,
    Message,
    RouteOutcome,
    RouteRequest,
    RouteSpec,
    route_set_key,
)

# The metric label of routes only a request defined.
REQUEST_DEFINED = "request_defined"


@dataclass(frozen=True, slots=True)
class Dispatched:
    """A Dispatch call's answer: the routing outcome and the model's completion."""

    outcome: RouteOutcome
    completion: Completion


class _EngineFailed(Exception):
    def __init__(self, outcome: RouteOutcome) -> None:
        super().__init__(outcome.fallback_detail)
        self.outcome = outcome


class Router:
    """Holds the current config (swapped atomically on reload), the engine, the dispatcher,
    the decision cache and the sessions."""

    def __init__(
        self, config: AppConfig, engine: Engine, dispatcher: Dispatcher | None = None
    ) -> None:
        self._config = config
        self._engine = engine
        self._dispatcher = dispatcher or Dispatcher()
        self._dispatcher.configure(config)
        self._decisions = DecisionCache(config.routing.decision_cache_size)
        self._session_policy = SessionPolicy(config.session)

    @property
    def sessions(self) -> SessionStore:
        return self._session_policy.store

    @property
    def config(self) -> AppConfig:
        return self._config

    @property
    def engine(self) -> Engine:
        return self._engine

    def swap_config(self, config: AppConfig) -> None:
        """Serve `config` from the next call on. Calls in flight keep the snapshot they took.
        The engine is not rebuilt: engine changes need a restart."""
        self._config = config
        self._dispatcher.configure(config)  # breakers keep the state of kept models
        self._decisions.max_entries = config.routing.decision_cache_size
        self._session_policy.resize(config.session)

    async def close(self) -> None:
        await self._dispatcher.close()

    # -- validation -------------------------------------------------------------------------

    def validate(self, request: RouteRequest, config: AppConfig | None = None) -> None:
        """Raise InvalidArgument naming the first offending field."""
        validate_request(request, config or self._config)

    # -- routing ----------------------------------------------------------------------------

    async def route(self, request: RouteRequest, *, timeout_s: float | None = None) -> RouteOutcome:
        """Decide the route for `request`. `timeout_s` (e.g. the caller's remaining deadline)
        caps the engine's configured timeout."""
        cfg = self._config
        self.validate(request, cfg)
        routes = request.routes if request.routes is not None else cfg.route_specs()
        view = routing_view(request.messages, cfg.routing.strip_tags)
        route_set = route_set_key(routes)
        key = view_key(view, route_set)
        turn = self._session_policy.begin(cfg.session, request.session_id, route_set, key)
        held = turn.held()
        if held is not None:  # no new user turn: a tool step
            return self._held(cfg, held, routes, turn)
        need_scores = request.full_scores or turn.session is not None
        decision = self._decisions.get(key, need_scores=need_scores)
        source = DecisionSource.CACHE
        engine_ms = 0.0
        if decision is None:
            source = DecisionSource.ENGINE
            start = time.perf_counter()
            try:
                decision = await self._decide(cfg, view, routes, need_scores, timeout_s)
            except _EngineFailed as failed:
                return replace(failed.outcome, session_status=turn.status)
            engine_ms = (time.perf_counter() - start) * 1000
            metrics.DECISION_LATENCY.labels(decision.engine or self._engine.name).observe(
                engine_ms / 1000
            )
            tracing.add_phase_spans(
                decision.timings_ms, time.time_ns(), decision.engine or self._engine.name
            )
            self._decisions.put(key, decision)
        metrics.DECISION_SOURCES.labels(source).inc()
        answer = self._session_policy.settle(turn, decision)
        outcome = self._apply_policy(cfg, answer.decision, routes, engine_ms, held=answer.pinned)
        if source is DecisionSource.CACHE:  # the cached run's timings are not this call's
            outcome = replace(outcome, timings_ms={"engine": 0.0})
        outcome = replace(
            outcome,
            scores=outcome.scores if request.full_scores else {},
            decision=decision,
            engine_route=decision.route,
            source=source,
            session_status=turn.status,
            pinned=answer.pinned,
            switched=answer.switched,
        )
        self._count(outcome)
        _annotate_span(outcome)
        return outcome

    async def _decide(
        self,
        cfg: AppConfig,
        view: tuple[Message, ...],
        routes: Sequence[RouteSpec],
        full_scores: bool,
        timeout_s: float | None,
    ) -> Decision:
        """The engine's decision; a failure becomes `_EngineFailed` carrying the fail-open
        outcome (or raises, fail-closed)."""
        limit = cfg.routing.engine_timeout_s
        if timeout_s is not None:
            limit = min(limit, timeout_s)
        metrics.QUEUE_DEPTH.inc()
        try:
            async with asyncio.timeout(limit):
                return await self._engine.decide(view, routes, full_scores=full_scores)
        except InvalidArgument:
            raise
        except TimeoutError:
            failed = self._failed(
                cfg, FallbackReason.ENGINE_TIMEOUT, f"no decision in {limit:.3g}s"
            )
        except Overloaded as e:
            failed = self._failed(cfg, FallbackReason.OVERLOADED, str(e) or "engine queue full", e)
        except EngineUnavailable as e:
            failed = self._failed(cfg, FallbackReason.ENGINE_ERROR, str(e) or "engine unavailable")
        except Exception as e:  # a crashing engine must not take the call down when fail-open
            failed = self._failed(cfg, FallbackReason.ENGINE_ERROR, f"{type(e).__name__}: {e}")
        finally:
            metrics.QUEUE_DEPTH.dec()
        raise _EngineFailed(failed)

    def _held(
        self, cfg: AppConfig, held: Decision, routes: Sequence[RouteSpec], turn: SessionTurn
    ) -> RouteOutcome:
        """A call that adds no user turn: the session's route, without running the model."""
        metrics.DECISION_SOURCES.labels(DecisionSource.SESSION).inc()
        outcome = replace(
            self._apply_policy(cfg, held, routes, 0.0, held=True),
            engine="",
            decision=None,
            source=DecisionSource.SESSION,
            session_status=turn.status,
            pinned=True,
        )
        self._count(outcome)
        return outcome

    def _count(self, outcome: RouteOutcome) -> None:
        """Metrics of an answered call. Route labels are the configured routes and the default
        route; a route only a request defined counts as `request_defined`, so that callers
        cannot grow the label set."""
        cfg = self._config
        known = outcome.route == cfg.default_route or cfg.route(outcome.route) is not None
        metrics.DECISIONS.labels(outcome.route if known else REQUEST_DEFINED).inc()
        if outcome.fallback_reason:
            metrics.FALLBACKS.labels(outcome.fallback_reason).inc()

    def _apply_policy(
        self,
        cfg: AppConfig,
        d: Decision,
        routes: Sequence[RouteSpec],
        engine_ms: float,
        *,
        held: bool = False,
    ) -> RouteOutcome:
        """Map an engine answer onto the configured models; `held` (a session's route) is not
        held to the confidence threshold."""
        names = [r.name for r in routes]
        reason = FallbackReason.NONE
        route = d.route
        if d.route == OTHER_ROUTE:
            reason = FallbackReason.OTHER
        elif d.route not in names:
            reason = FallbackReason.UNKNOWN_ROUTE
        elif d.confidence < cfg.routing.threshold and not held:
            reason = FallbackReason.BELOW_THRESHOLD
        if reason:
            route = cfg.default_route
        scores: dict[str, float] = {}
        if d.scores:
            for name in [*names, OTHER_ROUTE]:
                if name in d.scores:
                    scores[name] = float(d.scores[name])
            for name, p in d.scores.items():
                scores.setdefault(name, float(p))
        timings = {**d.timings_ms, "engine": engine_ms}
        return RouteOutcome(
            route=route,
            model=cfg.model_chain(route)[0],
            confidence=float(d.confidence),
            scores=scores,
            engine=d.engine or self._engine.name,
            fallback_used=bool(reason),
            fallback_reason=reason,
            timings_ms=timings,
            decision=d,
        )

    def _failed(
        self, cfg: AppConfig, reason: FallbackReason, detail: str, cause: Exception | None = None
    ) -> RouteOutcome:
        if not cfg.routing.fail_open:
            metrics.FALLBACKS.labels(reason).inc()
            if isinstance(cause, Overloaded):
                raise Overloaded(detail)
            raise EngineUnavailable(f"{reason}: {detail}")
        route = cfg.default_route
        outcome = RouteOutcome(
            route=route,
            model=cfg.model_chain(route)[0],
            confidence=0.0,
            scores={},
            engine="",
            fallback_used=True,
            fallback_reason=reason,
            fallback_detail=detail,
        )
        self._count(outcome)
        return outcome

    # -- dispatch ---------------------------------------------------------------------------

    def _chain(self, cfg: AppConfig, route: str) -> list[tuple[str, ModelConfig]]:
        return [(key, cfg.models[key]) for key in cfg.model_chain(route)]

    async def dispatch(
        self,
        request: RouteRequest,
        params: GenerationParams,
        *,
        timeout_s: float | None = None,
    ) -> Dispatched:
        """Route, then ask the route's models in order (then the default model)."""
        cfg = self._config
        validate_params(params)
        outcome = await self.route(request, timeout_s=timeout_s)
        completion = await self._dispatcher.complete(
            self._chain(cfg, outcome.route), request.messages, params
        )
        return Dispatched(outcome, completion)

    async def dispatch_stream(
        self,
        request: RouteRequest,
        params: GenerationParams,
        *,
        timeout_s: float | None = None,
    ) -> AsyncIterator[RouteOutcome | StreamDelta | StreamEnd]:
        """Yield the routing outcome first, then text deltas, then a StreamEnd."""
        cfg = self._config
        validate_params(params)
        outcome = await self.route(request, timeout_s=timeout_s)
        yield outcome
        async for event in self._dispatcher.stream(
            self._chain(cfg, outcome.route), request.messages, params
        ):
            yield event


def _annotate_span(outcome: RouteOutcome) -> None:
    """The decision on the current span (the RPC's, or ext_proc's routing span)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(
            tracing.span_attributes(
                **{
                    "router.route": outcome.route,
                    "router.model": outcome.model,
                    "router.engine_route": outcome.engine_route,
                    "router.source": outcome.source.value,
                    "router.fallback_reason": outcome.fallback_reason.value,
                    "router.session_status": outcome.session_status.value,
                    "router.pinned": outcome.pinned,
                    "router.switched": outcome.switched,
                }
            )
        )
