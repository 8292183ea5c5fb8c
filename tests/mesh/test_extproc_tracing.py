"""ext_proc continues the trace of the HTTP request it routes (its `traceparent` header), seen
through an in-memory span exporter in this process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from grpc_router.core.router import Router
from grpc_router.engines.arch_router.engine import ArchRouterEngine
from grpc_router.observability import tracing
from grpc_router.settings import ArchRouterSettings, TracingConfig
from tests.mesh.harness import LoopThread, ProcessStream, http_body, http_headers
from tests.mesh.test_extproc import OPENAI, Mesh, router_config

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    sink = InMemorySpanExporter()
    # The process's provider is set once; this module's spans land in `sink`.
    if not tracing.setup_tracing(TracingConfig(enabled=True), exporter=sink):
        pytest.fail("tracing did not start")
    return sink


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def router(loop: LoopThread, tiny_artifacts: Path) -> Iterator[Router]:
    engine = ArchRouterEngine(
        tiny_artifacts, ArchRouterSettings(variant="int8", provider="cpu", intra_op_threads=1)
    )
    loop.run(engine.start())
    yield Router(router_config(), engine)
    loop.run(engine.close())


def test_the_routing_span_continues_the_http_requests_trace(
    exporter: InMemorySpanExporter, loop: LoopThread, router: Router
) -> None:
    mesh = Mesh(loop)
    try:
        stream = ProcessStream(mesh.serve(router))
        traceparent = f"00-{TRACE_ID}-{PARENT_ID}-01"
        stream.send(http_headers(OPENAI, extra={"traceparent": traceparent}))
        body = {"model": "x", "messages": [{"role": "user", "content": "Fix my SQL query."}]}
        answer = stream.send(http_body(body))
        assert answer.HasField("request_body")
        stream.finish()
    finally:
        mesh.close()
    tracing.flush()
    spans = [s for s in exporter.get_finished_spans() if f"{s.context.trace_id:032x}" == TRACE_ID]
    (route,) = [s for s in spans if s.name == "extproc.route"]
    assert route.parent is not None and f"{route.parent.span_id:016x}" == PARENT_ID
    assert route.attributes is not None and route.attributes["router.source"] == "engine"
    phases = [s for s in spans if s.name.startswith("engine.")]
    assert {s.name for s in phases} >= {"engine.queue", "engine.prefill"}
    assert all(s.parent is not None and s.parent.span_id == route.context.span_id for s in phases)
