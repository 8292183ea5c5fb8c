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


def observe_batch_size(size: int) -> None:
    """For engines that batch: record how many conversations one engine run served."""
    BATCH_SIZE.observe(size)


def serve_metrics(host: str, port: int) -> int:
    """Start the Prometheus HTTP endpoint in a daemon thread; returns the bound port."""
    server, _ = start_http_server(port, addr=host)
    return int(server.server_address[1])
