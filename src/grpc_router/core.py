"""The router core: validate a request, ask the engine, apply policy, map the route to models.

Transport-agnostic: the gRPC servicer and the Envoy ext_proc servicer both call `Router.route`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from grpc_router import metrics
from grpc_router.config import ROUTE_NAME_RE, AppConfig, ModelConfig
from grpc_router.dispatch import (
    Completion,
    Dispatcher,
    GenerationParams,
    StreamDelta,
    StreamEnd,
)
from grpc_router.errors import EngineUnavailable, InvalidArgument, Overloaded
from grpc_router.types import (
    OTHER_ROUTE,
    Decision,
    Engine,
    Message,
    Role,
    RouteOutcome,
    RouteRequest,
    RouteSpec,
)

# fallback_reason values (RouteOutcome documents them; the proto has a matching enum).
FALLBACK_OTHER = "other"
FALLBACK_BELOW_THRESHOLD = "below_threshold"
FALLBACK_ENGINE_ERROR = "engine_error"
FALLBACK_ENGINE_TIMEOUT = "engine_timeout"
FALLBACK_OVERLOADED = "overloaded"
FALLBACK_UNKNOWN_ROUTE = "unknown_route"

MAX_STOP_SEQUENCES = 4


@dataclass(frozen=True, slots=True)
class Dispatched:
    """A Dispatch call's answer: the routing outcome and the model's completion."""

    outcome: RouteOutcome
    completion: Completion


class Router:
    """Holds the current config (swapped atomically on reload), the engine and the dispatcher."""

    def __init__(
        self, config: AppConfig, engine: Engine, dispatcher: Dispatcher | None = None
    ) -> None:
        self._config = config
        self._engine = engine
        self._dispatcher = dispatcher or Dispatcher()

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

    async def close(self) -> None:
        await self._dispatcher.close()

    # -- validation -------------------------------------------------------------------------

    def validate(self, request: RouteRequest, config: AppConfig | None = None) -> None:
        """Raise InvalidArgument naming the first offending field."""
        cfg = config or self._config
        lim = cfg.limits
        msgs = request.messages
        if not msgs:
            raise InvalidArgument("messages", "at least one message is required")
        if len(msgs) > lim.max_messages:
            raise InvalidArgument(
                "messages", f"{len(msgs)} messages exceed the limit of {lim.max_messages}"
            )
        for i, m in enumerate(msgs):
            if not isinstance(m.role, Role):
                raise InvalidArgument(f"messages[{i}].role", f"unknown role {m.role!r}")
            if len(m.content) > lim.max_content_chars:
                raise InvalidArgument(
                    f"messages[{i}].content",
                    f"{len(m.content)} characters exceed the limit of {lim.max_content_chars}",
                )
        if not any(m.role is Role.USER and m.content.strip() for m in msgs):
            raise InvalidArgument("messages", "at least one non-empty user message is required")
        if request.routes is not None:
            _validate_routes(request.routes, cfg)

    # -- routing ----------------------------------------------------------------------------

    async def route(self, request: RouteRequest, *, timeout_s: float | None = None) -> RouteOutcome:
        """Decide the route for `request`. `timeout_s` (e.g. the caller's remaining deadline)
        caps the engine's configured timeout."""
        cfg = self._config
        self.validate(request, cfg)
        routes = request.routes if request.routes is not None else cfg.route_specs()
        limit = cfg.routing.engine_timeout_s
        if timeout_s is not None:
            limit = min(limit, timeout_s)
        start = time.perf_counter()
        metrics.QUEUE_DEPTH.inc()
        try:
            async with asyncio.timeout(limit):
                decision = await self._engine.decide(
                    request.messages, routes, full_scores=request.full_scores
                )
        except InvalidArgument:
            raise
        except TimeoutError:
            return self._failed(cfg, FALLBACK_ENGINE_TIMEOUT, f"no decision in {limit:.3g}s")
        except Overloaded as e:
            return self._failed(cfg, FALLBACK_OVERLOADED, str(e) or "engine queue full", e)
        except EngineUnavailable as e:
            return self._failed(cfg, FALLBACK_ENGINE_ERROR, str(e) or "engine unavailable")
        except Exception as e:  # a crashing engine must not take the call down when fail-open
            return self._failed(cfg, FALLBACK_ENGINE_ERROR, f"{type(e).__name__}: {e}")
        finally:
            metrics.QUEUE_DEPTH.dec()
        engine_ms = (time.perf_counter() - start) * 1000
        metrics.DECISION_LATENCY.labels(decision.engine or self._engine.name).observe(
            engine_ms / 1000
        )
        outcome = self._apply_policy(cfg, decision, routes, engine_ms)
        metrics.DECISIONS.labels(outcome.route).inc()
        if outcome.fallback_reason:
            metrics.FALLBACKS.labels(outcome.fallback_reason).inc()
        return outcome

    def _apply_policy(
        self, cfg: AppConfig, d: Decision, routes: Sequence[RouteSpec], engine_ms: float
    ) -> RouteOutcome:
        names = [r.name for r in routes]
        reason = ""
        route = d.route
        if d.route == OTHER_ROUTE:
            reason = FALLBACK_OTHER
        elif d.route not in names:
            reason = FALLBACK_UNKNOWN_ROUTE
        elif d.confidence < cfg.routing.threshold:
            reason = FALLBACK_BELOW_THRESHOLD
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
        self, cfg: AppConfig, reason: str, detail: str, cause: Exception | None = None
    ) -> RouteOutcome:
        metrics.FALLBACKS.labels(reason).inc()
        if not cfg.routing.fail_open:
            if isinstance(cause, Overloaded):
                raise Overloaded(detail)
            raise EngineUnavailable(f"{reason}: {detail}")
        route = cfg.default_route
        metrics.DECISIONS.labels(route).inc()
        return RouteOutcome(
            route=route,
            model=cfg.model_chain(route)[0],
            confidence=0.0,
            scores={},
            engine="",
            fallback_used=True,
            fallback_reason=reason,
            fallback_detail=detail,
        )

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
        _validate_params(params)
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
        _validate_params(params)
        outcome = await self.route(request, timeout_s=timeout_s)
        yield outcome
        async for event in self._dispatcher.stream(
            self._chain(cfg, outcome.route), request.messages, params
        ):
            yield event


def _validate_routes(routes: Sequence[RouteSpec], cfg: AppConfig) -> None:
    lim = cfg.limits
    if not routes:
        raise InvalidArgument("routes", "an explicit route set must not be empty")
    if len(routes) > lim.max_routes:
        raise InvalidArgument(
            "routes", f"{len(routes)} routes exceed the limit of {lim.max_routes}"
        )
    seen: set[str] = set()
    for i, r in enumerate(routes):
        if not ROUTE_NAME_RE.match(r.name):
            raise InvalidArgument(
                f"routes[{i}].name", f"{r.name!r} must match {ROUTE_NAME_RE.pattern}"
            )
        if r.name == OTHER_ROUTE:
            raise InvalidArgument(f"routes[{i}].name", f"'{OTHER_ROUTE}' is reserved")
        if r.name in seen:
            raise InvalidArgument(f"routes[{i}].name", f"duplicate route name {r.name!r}")
        seen.add(r.name)
        if not r.description.strip():
            raise InvalidArgument(f"routes[{i}].description", "must not be empty")
        if len(r.description) > lim.max_description_chars:
            raise InvalidArgument(
                f"routes[{i}].description",
                f"{len(r.description)} characters exceed the limit of {lim.max_description_chars}",
            )


def _validate_params(p: GenerationParams) -> None:
    if p.temperature is not None and not 0.0 <= p.temperature <= 2.0:
        raise InvalidArgument("temperature", "must be between 0 and 2")
    if p.top_p is not None and not 0.0 < p.top_p <= 1.0:
        raise InvalidArgument("top_p", "must be in (0, 1]")
    if p.max_tokens is not None and p.max_tokens < 1:
        raise InvalidArgument("max_tokens", "must be at least 1")
    if len(p.stop) > MAX_STOP_SEQUENCES:
        raise InvalidArgument("stop", f"at most {MAX_STOP_SEQUENCES} stop sequences")


def request_messages(pairs: Sequence[tuple[str, str]]) -> tuple[Message, ...]:
    """Build messages from (role, content) pairs, naming the field of an unknown role."""
    out: list[Message] = []
    for i, (role, content) in enumerate(pairs):
        try:
            out.append(Message(Role(role), content))
        except ValueError:
            raise InvalidArgument(f"messages[{i}].role", f"unknown role {role!r}") from None
    return tuple(out)
