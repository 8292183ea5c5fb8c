"""The configuration file's schema: the application's sections as frozen pydantic models."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from grpc_router.settings.engines import EngineConfig
from grpc_router.settings.extproc import ExtProcSettings
from grpc_router.types import OTHER_ROUTE, RouteSpec

# Documented in the proto and the README; also applied to per-request route sets.
ROUTE_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
ROUTE_NAME_RE = re.compile(ROUTE_NAME_PATTERN)
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_TAG_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.:-]{0,63}$")
_MODEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


def _env_value(m: re.Match[str]) -> str:
    value = os.environ.get(m.group(1))
    if value:
        return value
    if m.group(2) is not None:
        return m.group(2)
    raise ValueError(f"environment variable {m.group(1)} is not set and has no default")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RouteConfig(_Strict):
    name: str = Field(pattern=ROUTE_NAME_PATTERN)
    description: str = Field(min_length=1)
    models: list[str] = Field(min_length=1)
    """Model keys, preferred first; the rest are fallbacks, in order."""
    examples: list[str] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _not_other(cls, v: str) -> str:
        if v == OTHER_ROUTE:
            raise ValueError(f"'{OTHER_ROUTE}' is reserved for the engine's no-match answer")
        return v

    def spec(self) -> RouteSpec:
        return RouteSpec(self.name, self.description, tuple(self.examples))


class ModelConfig(_Strict):
    base_url: str = Field(pattern=r"^https?://")
    """OpenAI-compatible API root, e.g. https://api.openai.com/v1. `${VAR}` and
    `${VAR:-default}` are expanded from the environment at load time."""
    model: str = Field(min_length=1)
    """Model name sent upstream."""
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Environment variable holding the API key, read at call time; None sends no key."""
    timeout_s: float = Field(default=60.0, gt=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("base_url", mode="before")
    @classmethod
    def _expand(cls, v: Any) -> Any:
        return _ENV_RE.sub(_env_value, v) if isinstance(v, str) else v


class TlsConfig(_Strict):
    cert: Path
    key: Path
    client_ca: Path | None = None
    """When set, clients must present a certificate signed by this CA (mTLS)."""


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=50051, ge=0, le=65535)
    """0 picks a free port (printed at start-up)."""
    grace_s: float = Field(default=10.0, ge=0)
    """On SIGTERM, how long calls in flight may take to finish."""
    max_concurrent_rpcs: int | None = Field(default=None, ge=1)
    """Routing calls (Route, Dispatch, DispatchStream, ext_proc streams) served at once; more
    are refused with RESOURCE_EXHAUSTED. A call counts once its request has arrived. Health,
    reflection and ListRoutes are outside the limit. None is unbounded."""
    overload_queue_depth: int = Field(default=48, ge=1)
    """The `grpc_router.readiness` health service reports NOT_SERVING while the engine queue
    holds at least this many routing requests (or max_concurrent_rpcs calls are in flight)."""
    keepalive_time_s: float = Field(default=60.0, gt=0)
    """HTTP/2 keepalive: ping a client connection after this long without activity."""
    keepalive_timeout_s: float = Field(default=20.0, gt=0)
    """Close a connection whose keepalive ping is not answered within this."""
    max_connection_idle_s: float | None = Field(default=None, gt=0)
    """Close (GOAWAY) a connection with no call for this long; None never does."""
    max_connection_age_s: float | None = Field(default=None, gt=0)
    """Close (GOAWAY) a connection this old, so clients reconnect (and rebalance); None
    never does."""
    max_connection_age_grace_s: float | None = Field(default=None, ge=0)
    """After max_connection_age_s, how long calls on the connection may still run before it is
    closed; None waits for them."""
    reflection: bool = True
    tls: TlsConfig | None = None


class LimitsConfig(_Strict):
    max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    """Largest gRPC request accepted (bigger ones get RESOURCE_EXHAUSTED from gRPC itself)."""
    max_messages: int = Field(default=64, ge=1)
    max_routes: int = Field(default=64, ge=1)
    max_content_chars: int = Field(default=32_000, ge=1)
    """Per message."""
    max_description_chars: int = Field(default=2_000, ge=1)
    max_examples: int = Field(default=32, ge=0)
    """Example utterances per route in a per-request route set."""
    max_example_chars: int = Field(default=500, ge=1)
    """Characters per example utterance."""
    max_request_id_chars: int = Field(default=128, ge=8, le=1024)
    """Longest caller request id (printable ASCII)."""


class RoutingConfig(_Strict):
    threshold: float = Field(default=0.0, ge=0.0, le=1.0)
    """Decisions with lower confidence use the default route."""
    fail_open: bool = True
    """On engine error, timeout or overload: True answers the default route with a
    fallback_reason; False fails the call (UNAVAILABLE / RESOURCE_EXHAUSTED)."""
    engine_timeout_s: float = Field(default=10.0, gt=0)
    strip_tags: tuple[str, ...] = ("system-reminder",)
    """Tag blocks removed from every message before routing (`<tag>…</tag>`, the tags
    included): harness notes that say nothing of the user's intent."""
    decision_cache_size: int = Field(default=10_000, ge=0)
    """Decisions kept by routing-relevant conversation and route set; a call whose
    conversation, once filtered, was decided before gets that decision without a model run.
    0 disables it."""

    @field_validator("strip_tags")
    @classmethod
    def _tag_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for tag in value:
            if not _TAG_RE.fullmatch(tag):
                raise ValueError(f"{tag!r}: a tag name is letters, digits, '-', '_', ':' or '.'")
        return value


class SessionConfig(_Strict):
    """How calls that carry a session id are routed."""

    policy: Literal["off", "sticky", "pin"] = "sticky"
    """off: every new user turn decides afresh; sticky: keep the session's route unless a new
    turn's best route beats it by `switch_margin`; pin: the first decision holds for the
    session's lifetime."""
    switch_margin: float = Field(default=0.3, ge=0.0, le=1.0)
    """sticky: how much more probable (on this turn) the engine's best route must be than the
    session's route to switch to it."""
    max_switches: int = Field(default=3, ge=0)
    """sticky: switches a session may make; then it stays where it is."""
    ttl_s: float = Field(default=3600.0, gt=0)
    """A session idle this long is forgotten; its next call starts afresh (and says so)."""
    max_sessions: int = Field(default=100_000, ge=1)
    """Sessions kept in memory; beyond this the least recently used is forgotten."""
    max_id_chars: int = Field(default=128, ge=1, le=1024)
    """Longest session id accepted (printable ASCII, no spaces)."""


class CircuitBreakerConfig(_Strict):
    """Per upstream model, with Envoy outlier-detection semantics: consecutive failures or
    timeouts open the breaker, calls skip the model while it is open, and after the cooldown
    one probe call decides whether it closes again."""

    enabled: bool = True
    consecutive_failures: int = Field(default=5, ge=1)
    """Failures (HTTP 5xx, 429, timeouts, connection errors) in a row that open the breaker."""
    cooldown_s: float = Field(default=30.0, gt=0)
    """How long an opened breaker skips its model before a half-open probe."""
    max_cooldown_s: float = Field(default=300.0, gt=0)
    """Each failed probe doubles the cooldown, up to this."""
    honor_retry_after: bool = True
    """A 429 with `Retry-After` opens the breaker for that long (capped by max_cooldown_s)."""


class TracingConfig(_Strict):
    """OpenTelemetry traces: one span per RPC, children for the engine and each upstream
    attempt; W3C `traceparent` is read from gRPC metadata and ext_proc request headers and
    passed to upstreams. Off by default."""

    enabled: bool = False
    otlp_endpoint: str = "http://127.0.0.1:4317"
    """OTLP/gRPC collector endpoint."""
    service_name: str = "grpc-router"
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    """Share of root traces sampled (parent-based: a sampled caller's trace is followed)."""


class LoggingConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    log_content: bool = False
    """Log message content too; only for debugging, never in production."""


class MetricsConfig(_Strict):
    host: str = "127.0.0.1"
    port: int | None = Field(default=9464, ge=0, le=65535)
    """Prometheus HTTP port; None disables it."""


class AppConfig(_Strict):
    routes: list[RouteConfig] = Field(min_length=1)
    models: dict[str, ModelConfig] = Field(min_length=1)
    default_route: str = Field(pattern=ROUTE_NAME_PATTERN)
    """Route answered for `other` and on failures; need not be one of `routes`."""
    default_model: str
    """Model of the default route, and the last fallback of every dispatch."""
    engine: EngineConfig = Field(default_factory=EngineConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    ext_proc: ExtProcSettings = Field(default_factory=ExtProcSettings)
    session: SessionConfig = Field(default_factory=SessionConfig)
    circuit_breaker: CircuitBreakerConfig = Field(default_factory=CircuitBreakerConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)

    @model_validator(mode="after")
    def _cross_refs(self) -> AppConfig:
        problems = cross_ref_problems(self.model_dump(mode="python"))
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def route(self, name: str) -> RouteConfig | None:
        return next((r for r in self.routes if r.name == name), None)

    def route_specs(self) -> tuple[RouteSpec, ...]:
        return tuple(r.spec() for r in self.routes)

    def model_chain(self, route: str) -> list[str]:
        """Models to try for `route`, in order: its own (none for a route the config does not
        know), then the default model."""
        cfg = self.route(route)
        chain = list(cfg.models) if cfg is not None else []
        if self.default_model not in chain:
            chain.append(self.default_model)
        return chain


def cross_ref_problems(data: dict[str, Any]) -> list[str]:
    """Checks across sections, tolerant of malformed input so they can run alongside field
    validation and every error is reported at once."""
    problems: list[str] = []
    models = data.get("models")
    model_keys = set(models) if isinstance(models, dict) else None
    routes = data.get("routes")
    seen: set[str] = set()
    for i, r in enumerate(routes if isinstance(routes, list) else []):
        if not isinstance(r, dict):
            continue
        name = r.get("name")
        if isinstance(name, str):
            if name in seen:
                problems.append(f"routes.{i}.name: duplicate route name '{name}'")
            seen.add(name)
        route_models = r.get("models")
        if model_keys is not None and isinstance(route_models, list):
            for j, m in enumerate(route_models):
                if isinstance(m, str) and m not in model_keys:
                    problems.append(f"routes.{i}.models.{j}: unknown model '{m}'")
    for key in model_keys or ():
        if not isinstance(key, str) or not _MODEL_KEY_RE.match(key):
            problems.append(f"models.{key}: model key must match {_MODEL_KEY_RE.pattern}")
    default_model = data.get("default_model")
    if (
        model_keys is not None
        and isinstance(default_model, str)
        and default_model not in model_keys
    ):
        problems.append(f"default_model: unknown model '{default_model}'")
    limits = data.get("limits")
    max_routes = limits.get("max_routes") if isinstance(limits, dict) else None
    if not isinstance(max_routes, int):
        max_routes = LimitsConfig().max_routes
    if isinstance(routes, list) and len(routes) > max_routes:
        problems.append(f"routes: {len(routes)} routes exceed limits.max_routes ({max_routes})")
    return problems
