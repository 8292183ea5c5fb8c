"""Prometheus metrics. Engines may call `observe_batch_size`; everything else is recorded by the
router core, dispatch and the gRPC interceptor."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

DECISION_LATENCY = Histogram(
    "grpc_router_decision_seconds",
    "Time to a routing decision (engine call, queue included), by engine.",
    ["engine"],
    buckets=_LATENCY_BUCKETS,
)
DECISIONS = Counter(
    "grpc_router_decisions_total", "Routing decisions, by answered route.", ["route"]
)
FALLBACKS = Counter(
    "grpc_router_fallbacks_total", "Decisions that used the default route, by reason.", ["reason"]
)
DECISION_SOURCES = Counter(
    "grpc_router_decision_sources_total",
    "Decisions by where they came from: engine, cache (same conversation decided before) or "
    "session (a tool step, no model run).",
    ["source"],
)
SESSIONS = Gauge("grpc_router_sessions", "Sessions held in this replica's memory.")
SESSION_EVENTS = Counter(
    "grpc_router_session_events_total",
    "Session events: new, expired (started afresh), switched (moved to a new route), held "
    "(kept its route against the engine's choice).",
    ["event"],
)
UPSTREAM_LATENCY = Histogram(
    "grpc_router_upstream_seconds",
    "Upstream LLM call latency (failed attempts included), by model key.",
    ["model"],
    buckets=(*_LATENCY_BUCKETS, 60.0, 120.0),
)
UPSTREAM_ERRORS = Counter(
    "grpc_router_upstream_errors_total",
    "Failed upstream LLM attempts, by model key and reason.",
    ["model", "reason"],
)
# Label values are configured model keys only (set by `CircuitBreakers.configure` in
# `grpc_router.dispatch.breaker`, which records both).
CIRCUIT_STATE = Gauge(
    "grpc_router_circuit_state",
    "Circuit breaker state of each configured upstream model: 0 closed, 1 open, 2 half-open.",
    ["model"],
)
CIRCUIT_TRANSITIONS = Counter(
    "grpc_router_circuit_transitions_total",
    "Circuit breaker transitions, by model key and the state entered.",
    ["model", "to"],
)
BATCH_SIZE = Histogram(
    "grpc_router_engine_batch_size",
    "Conversations per engine batch.",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
QUEUE_DEPTH = Gauge(
    "grpc_router_engine_queue_depth", "Routing requests waiting for or inside the engine."
)
IN_FLIGHT = Gauge("grpc_router_in_flight_calls", "gRPC calls being served, by method.", ["method"])
CALLS = Counter(
    "grpc_router_calls_total", "Finished gRPC calls, by method and status code.", ["method", "code"]
)


_TOKEN_BUCKETS = (0, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
PREFILL_TOKENS = Histogram(
    "grpc_router_prefill_tokens",
    "Prompt tokens an engine prefilled for one decision.",
    buckets=_TOKEN_BUCKETS,
)
REUSED_TOKENS = Histogram(
    "grpc_router_reused_tokens",
    "Prompt tokens one decision reused from the prefix KV cache.",
    buckets=_TOKEN_BUCKETS,
)
PREFIX_CACHE_BYTES = Gauge("grpc_router_prefix_cache_bytes", "Bytes of KV in the prefix cache.")
PREFIX_CACHE_ENTRIES = Gauge(
    "grpc_router_prefix_cache_entries", "Token sequences whose KV the prefix cache keeps."
)
PREFIX_CACHE_EVICTIONS = Counter(
    "grpc_router_prefix_cache_evictions_total", "Entries evicted from the prefix KV cache."
)


def observe_prefill(reused: int, prefilled: int) -> None:
    """For engines with a prefix cache: tokens reused and prefilled by one decision."""
    REUSED_TOKENS.observe(reused)
    PREFILL_TOKENS.observe(prefilled)


def observe_prefix_cache(entries: int, nbytes: int) -> None:
    """The prefix cache's size after a batch."""
    PREFIX_CACHE_ENTRIES.set(entries)
    PREFIX_CACHE_BYTES.set(nbytes)


def count_prefix_eviction() -> None:
    PREFIX_CACHE_EVICTIONS.inc()


DROPPED = Counter(
    "grpc_router_engine_dropped_total",
    "Queued engine work dropped before it ran because its caller had gone (cancelled or past "
    "its deadline).",
)


def count_dropped(jobs: int) -> None:
    DROPPED.inc(jobs)


def observe_batch_size(size: int) -> None:
    """For engines that batch: record how many conversations one engine run served."""
    BATCH_SIZE.observe(size)


def serve_metrics(host: str, port: int) -> int:
    """Start the Prometheus HTTP endpoint in a daemon thread; returns the bound port."""
    server, _ = start_http_server(port, addr=host)
    return int(server.server_address[1])
