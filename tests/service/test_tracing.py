"""OpenTelemetry traces over real processes: the server exports OTLP/gRPC to a collector the
test runs on loopback; the fake upstream records the traceparent it was sent. A span
processor with an in-memory exporter checks the ext_proc path in process."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from grpc_router.v1 import router_pb2 as pb
from tests.service.conftest import make_config, route_request, start_server
from tests.service.fake_upstream import FakeUpstream

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


class Collector(otlp_grpc.TraceServiceServicer):  # type: ignore[misc]
    """An OTLP/gRPC trace collector that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[trace_pb2.Span] = []
        self._lock = threading.Lock()

    def Export(
        self, request: otlp.ExportTraceServiceRequest, context: Any
    ) -> otlp.ExportTraceServiceResponse:
        with self._lock:
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    self.spans.extend(scope.spans)
        return otlp.ExportTraceServiceResponse()


@pytest.fixture
def collector() -> Iterator[tuple[Collector, int]]:
    sink = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    otlp_grpc.add_TraceServiceServicer_to_server(sink, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield sink, port
    server.stop(None)


def test_dispatch_continues_the_callers_trace_to_the_upstream(
    tmp_path: Path,
    upstream: FakeUpstream,
    encoder_artifact: Path,
    collector: tuple[Collector, int],
) -> None:
    sink, port = collector
    engine: dict[str, Any] = {"kind": "encoder", "encoder_artifact": str(encoder_artifact)}
    cfg = make_config(
        upstream.base_url,
        engine,
        chain=["r500", "ok_a"],
        tracing={"enabled": True, "otlp_endpoint": f"http://127.0.0.1:{port}"},
    )
    server = start_server(tmp_path, cfg)
    try:
        upstream.log.clear()
        reply = server.stub.Dispatch(
            pb.DispatchRequest(route=route_request("Translate 'hello' into German.")),
            metadata=(("traceparent", TRACEPARENT),),
            timeout=30,
        )
        assert reply.answered_by == "ok_a"
        sent = [r.headers.get("traceparent", "") for r in upstream.log.requests]
        assert len(sent) == 2 and all(h.split("-")[1] == TRACE_ID for h in sent)
    finally:
        assert server.stop() == 0  # the exporter flushes at shutdown
    spans = [s for s in sink.spans if s.trace_id.hex() == TRACE_ID]
    by_name: dict[str, list[trace_pb2.Span]] = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    (rpc,) = by_name["/grpc_router.v1.RouterService/Dispatch"]
    assert rpc.parent_span_id.hex() == PARENT_ID
    attributes = {a.key: a.value.string_value for a in rpc.attributes}
    assert attributes["router.source"] == "engine"
    attempts = by_name["upstream.attempt"]
    assert len(attempts) == 2 and all(a.parent_span_id == rpc.span_id for a in attempts)
    failed = [a for a in attempts if a.status.code == trace_pb2.Status.STATUS_CODE_ERROR]
    assert len(failed) == 1
    # the engine's phases are children of the RPC's span too
    assert any(name.startswith("engine.") for name in by_name)
    for name, found in by_name.items():
        if name.startswith("engine."):
            assert all(s.parent_span_id == rpc.span_id for s in found)


def test_tracing_is_off_by_default(
    tmp_path: Path,
    upstream: FakeUpstream,
    encoder_artifact: Path,
    collector: tuple[Collector, int],
) -> None:
    sink, _ = collector
    engine: dict[str, Any] = {"kind": "encoder", "encoder_artifact": str(encoder_artifact)}
    cfg = make_config(upstream.base_url, engine)
    server = start_server(tmp_path, cfg)
    try:
        upstream.log.clear()
        server.stub.Dispatch(
            pb.DispatchRequest(route=route_request("hello there")),
            metadata=(("traceparent", TRACEPARENT),),
            timeout=30,
        )
        # no span was started here: the caller's context is not forwarded either
        assert all("traceparent" not in r.headers for r in upstream.log.requests)
    finally:
        assert server.stop() == 0
    assert sink.spans == []
