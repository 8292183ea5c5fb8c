"""OpenTelemetry traces: one span per RPC, children for the decision and each upstream attempt.

The gRPC server span comes from opentelemetry-instrumentation-grpc (W3C `traceparent` is read
from the call's metadata); ext_proc calls continue the trace of the HTTP request they process
(its `traceparent` header); upstream requests carry the context onward through the httpx
instrumentation. Export is OTLP/gRPC, configured by the `tracing:` section and off by
default: with it off, every helper here is a no-op on the global no-op tracer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from grpc_router.errors import RouterError
from grpc_router.settings import TracingConfig

TRACER_NAME = "grpc_router"

_provider: TracerProvider | None = None
# Decision timings that sum or wrap the phases rather than being one.
_NOT_PHASES = frozenset({"total", "engine"})


def setup_tracing(cfg: TracingConfig, exporter: SpanExporter | None = None) -> bool:
    """Install the process's tracer provider when `cfg.enabled` (once; later calls keep it).
    `exporter` replaces the OTLP exporter (tests pass an in-memory one). Returns whether
    traces are recorded."""
    global _provider
    if not cfg.enabled:
        return _provider is not None
    if _provider is None:
        if exporter is None:
            exporter = _otlp_exporter(cfg.otlp_endpoint)
        provider = TracerProvider(
            resource=Resource.create({"service.name": cfg.service_name}),
            sampler=ParentBased(TraceIdRatioBased(cfg.sample_ratio)),
        )
        provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        _provider = provider
    return True


def _otlp_exporter(endpoint: str) -> SpanExporter:
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError as exc:  # xds-protos installed after opentelemetry-proto overwrote it
        raise RouterError(
            f"tracing: the OTLP exporter cannot load ({exc}). xds-protos ships an older copy of "
            "the opentelemetry protos; restore them with `pip install --force-reinstall "
            "--no-deps opentelemetry-proto` (make install does), or set tracing.enabled: false"
        ) from exc
    return OTLPSpanExporter(endpoint=endpoint, insecure=True)


def shutdown_tracing() -> None:
    """Flush and stop the exporter (at process exit)."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None


def flush() -> None:
    if _provider is not None:
        _provider.force_flush()


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def add_phase_spans(timings_ms: Mapping[str, float], end_ns: int, engine: str) -> None:
    """Children of the current span for an engine decision's phases, laid end to end backwards
    from `end_ns` in the order the engine recorded them (Arch-Router: queue, prefill, then
    score or decode; the encoder: route_index, embed_score). The engine runs in its own
    thread; its phase timings become spans here, in the caller's context. Nothing is built
    when the current span is not recorded (tracing off, or the trace not sampled)."""
    if not trace.get_current_span().is_recording():
        return
    phases = [p for p, ms in timings_ms.items() if p not in _NOT_PHASES and ms > 0]
    starts: list[tuple[str, int, int]] = []
    at = end_ns
    for phase in reversed(phases):
        start = at - int(timings_ms[phase] * 1e6)
        starts.append((phase, start, at))
        at = start
    t = tracer()
    for phase, start, stop in reversed(starts):
        span = t.start_span(f"engine.{phase}", start_time=start, attributes={"engine": engine})
        span.end(end_time=stop)


@contextlib.contextmanager
def continue_from(headers: Mapping[str, str]) -> Iterator[None]:
    """Make the W3C trace context carried by `headers` (e.g. an HTTP request's, seen through
    ext_proc) the parent of the spans started inside."""
    ctx = propagate.extract(headers)
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)


def span_attributes(**values: Any) -> dict[str, Any]:
    """Attributes without empty values (OpenTelemetry rejects None)."""
    return {k: v for k, v in values.items() if v not in (None, "")}
