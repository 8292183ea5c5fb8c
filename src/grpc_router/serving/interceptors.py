"""gRPC server interceptor: request ids, one log line per call, exceptions -> status codes,
in-flight and call metrics."""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import grpc

from grpc_router.errors import (
    ArtifactError,
    EngineUnavailable,
    InvalidArgument,
    Overloaded,
    RouterError,
    UpstreamError,
)
from grpc_router.observability import logs, metrics

REQUEST_ID_HEADER = "x-request-id"
# Probes and tooling; they get no summary line.
_QUIET_PREFIXES = ("/grpc.health.", "/grpc.reflection.")

_log = logs.get_logger("grpc_router.call")


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message of an exception."""
    if isinstance(error, InvalidArgument):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error) or "engine queue full, retry later"
    if isinstance(error, EngineUnavailable):
        return grpc.StatusCode.UNAVAILABLE, str(error) or "engine unavailable"
    if isinstance(error, UpstreamError):
        return grpc.StatusCode.UNAVAILABLE, str(error)
    if isinstance(error, ArtifactError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(error)
    if isinstance(error, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
    if isinstance(error, RouterError):
        return grpc.StatusCode.INTERNAL, str(error)
    return grpc.StatusCode.INTERNAL, "internal error"


class _Call:
    """Bookkeeping of one call: context, timing, status, summary line."""

    def __init__(
        self, method: str, metadata: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        self.method = method
        self.context = context
        self.quiet = method.startswith(_QUIET_PREFIXES)
        rid = ""
        for key, value in metadata or ():
            if key == REQUEST_ID_HEADER and isinstance(value, str):
                rid = value[:128]
        self.fields = logs.start_call(rid or uuid.uuid4().hex)
        self.start = time.perf_counter()
        self.code = grpc.StatusCode.OK
        self.error = ""
        metrics.IN_FLIGHT.labels(method).inc()

    async def __aenter__(self) -> _Call:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, error: BaseException | None, tb: object
    ) -> bool:
        cancelled = isinstance(error, asyncio.CancelledError | GeneratorExit)
        try:
            if error is not None and not cancelled and not isinstance(error, grpc.aio.AbortError):
                await self.fail(error, self.context)  # raises AbortError
        finally:
            self.finish(self.context, cancelled)
        return False

    async def fail(self, error: BaseException, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.code, self.error = status_for(error)
        if self.code is grpc.StatusCode.INTERNAL:
            _log.exception("unhandled error", method=self.method)
        trailers: tuple[tuple[str, str], ...] = ()
        if isinstance(error, InvalidArgument):
            trailers = (("x-invalid-field", error.field),)
        context.set_trailing_metadata((*trailers, (REQUEST_ID_HEADER, logs.current_request_id())))
        await context.abort(self.code, self.error)

    def finish(self, context: grpc.aio.ServicerContext[Any, Any], cancelled: bool) -> None:
        metrics.IN_FLIGHT.labels(self.method).dec()
        if cancelled:
            self.code = grpc.StatusCode.CANCELLED
        elif self.code is grpc.StatusCode.OK:
            code = context.code()
            if isinstance(code, grpc.StatusCode):
                self.code = code
        metrics.CALLS.labels(self.method, self.code.name).inc()
        if self.quiet:
            return
        ms = round((time.perf_counter() - self.start) * 1000, 3)
        level = "info" if self.code is grpc.StatusCode.OK else "warning"
        extra = {"error": self.error} if self.error else {}
        getattr(_log, level)(
            "call", method=self.method, status=self.code.name, total_ms=ms, **self.fields, **extra
        )


def _unary_response(
    behavior: Callable[[Any, Any], Awaitable[Any]], method: str, metadata: Any
) -> Callable[[Any, Any], Awaitable[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        async with _Call(method, metadata, context):
            return await behavior(request, context)

    return wrapper


def _stream_response(
    behavior: Callable[[Any, Any], AsyncIterator[Any]], method: str, metadata: Any
) -> Callable[[Any, Any], AsyncIterator[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        async with _Call(method, metadata, context):
            result = behavior(request, context)
            if inspect.isawaitable(result):  # handlers that use context.write()
                await result
            else:
                async for item in result:
                    yield item

    return wrapper


class CallInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_QUIET_PREFIXES):
            return handler
        md = handler_call_details.invocation_metadata
        kw: dict[str, Any] = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _unary_response(handler.unary_unary, method, md), **kw
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _unary_response(handler.stream_unary, method, md), **kw
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _stream_response(cast(Any, handler.unary_stream), method, md), **kw
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                _stream_response(cast(Any, handler.stream_stream), method, md), **kw
            )
        return handler
