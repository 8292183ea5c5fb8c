"""Drive envoy.service.ext_proc.v3.ExternalProcessor the way Envoy does, over real loopback gRPC.

`LoopThread` runs a real grpc.aio server (and the engine it routes with) in its own event loop,
so tests stay synchronous. `ProcessStream` is one HTTP request as Envoy sees it: it sends a phase,
then waits for that phase's answer before sending the next one (Envoy's BUFFERED behaviour).
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from collections.abc import Coroutine, Iterator, Mapping
from typing import Any, TypeVar

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from prometheus_client import REGISTRY

from grpc_router.core.router import Router
from grpc_router.serving.extproc import register_ext_proc
from grpc_router.settings import ExtProcSettings

T = TypeVar("T")


def two_route_config(**sections: Any) -> dict[str, Any]:
    """A minimal router config (code_generation -> coder, general_chat -> general) as parsed
    YAML; the upstreams are never called, ext_proc only routes."""
    return {
        "routes": [
            {"name": "code_generation", "description": "Writing code.", "models": ["coder"]},
            {"name": "general_chat", "description": "Anything else.", "models": ["general"]},
        ],
        "models": {
            "coder": {"base_url": "http://127.0.0.1:9/v1", "model": "qwen2.5-coder-7b"},
            "general": {"base_url": "http://127.0.0.1:9/v1", "model": "qwen2.5-7b"},
        },
        "default_route": "general_chat",
        "default_model": "general",
        **sections,
    }


class LoopThread:
    """An asyncio loop in a daemon thread; `run` executes a coroutine on it and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


async def start_ext_proc_server(
    router: Router, settings: ExtProcSettings
) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server on a free loopback port serving only ext_proc."""
    server = grpc.aio.server()
    register_ext_proc(server, router, settings)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def http_headers(
    path: str,
    *,
    method: str = "POST",
    content_type: str | None = "application/json",
    extra: Mapping[str, str] | None = None,
    end_of_stream: bool = False,
) -> pb.ProcessingRequest:
    """request_headers as Envoy sends them (pseudo-headers first, values in raw_value)."""
    pairs = [(":authority", "llm.local"), (":path", path), (":method", method)]
    pairs.append((":scheme", "http"))
    if content_type is not None:
        pairs.append(("content-type", content_type))
    pairs.extend((extra or {}).items())
    pairs.append(("x-request-id", "7f1c0c8e-test"))
    return pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs]
            ),
            end_of_stream=end_of_stream,
        )
    )


def http_body(
    body: bytes | Mapping[str, Any], *, end_of_stream: bool = True
) -> pb.ProcessingRequest:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=raw, end_of_stream=end_of_stream))


def response_phases() -> list[tuple[str, pb.ProcessingRequest]]:
    """The response phases Envoy sends when configured to (SEND / BUFFERED)."""
    status = base_pb2.HeaderValue(key=":status", raw_value=b"200")
    return [
        (
            "response_headers",
            pb.ProcessingRequest(
                response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[status]))
            ),
        ),
        (
            "response_body",
            pb.ProcessingRequest(
                response_body=pb.HttpBody(body=b'{"choices":[]}', end_of_stream=True)
            ),
        ),
        ("request_trailers", pb.ProcessingRequest(request_trailers=pb.HttpTrailers())),
        ("response_trailers", pb.ProcessingRequest(response_trailers=pb.HttpTrailers())),
    ]


class ProcessStream:
    """One `Process` call: send a phase, read its answer, like Envoy."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._outbox: queue.Queue[pb.ProcessingRequest | None] = queue.Queue()
        stub = pb_grpc.ExternalProcessorStub(channel)
        self._responses: Iterator[pb.ProcessingResponse] = stub.Process(
            self._requests(), timeout=60
        )

    def _requests(self) -> Iterator[pb.ProcessingRequest]:
        while (item := self._outbox.get()) is not None:
            yield item

    def send(self, request: pb.ProcessingRequest) -> pb.ProcessingResponse:
        self._outbox.put(request)
        return next(self._responses)

    def post(self, request: pb.ProcessingRequest) -> None:
        """Send without waiting for the answer."""
        self._outbox.put(request)

    def finish(self) -> None:
        """Close our side; the server must then end the stream cleanly with no more answers."""
        self._outbox.put(None)
        assert next(self._responses, None) is None

    def cancel(self) -> None:
        """Reset the stream as Envoy does when the HTTP client goes away: no half-close first.
        (The request generator stays blocked; gRPC consumes it in a daemon thread.)"""
        self._responses.cancel()  # type: ignore[attr-defined]


def header_mutations(common: pb.CommonResponse) -> dict[str, str]:
    return {
        o.header.key: (o.header.raw_value.decode() or o.header.value)
        for o in common.header_mutation.set_headers
    }


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def wait_for_metric(name: str, above: float, timeout: float = 20, **labels: str) -> float:
    """Wait until the server thread has recorded an event (not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while (value := metric(name, **labels)) <= above and time.monotonic() < deadline:
        time.sleep(0.02)
    return value
