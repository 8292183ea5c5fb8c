"""gRPC server interceptor: request parsing, request ids, one log line per call, exceptions ->
status codes (INVALID_ARGUMENT with `google.rpc.BadRequest` details), the concurrency limit of
the routing calls, in-flight and call metrics, and the drain of calls at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import grpc
from google.protobuf import any_pb2, descriptor_pool
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2  # type: ignore[import-untyped]

from grpc_router.errors import (
    ArtifactError,
    EngineUnavailable,
    InvalidArgument,
    Overloaded,
    RouterError,
    UpstreamError,
)
from grpc_router.observability import logs, metrics
from grpc_router.settings import LimitsConfig

REQUEST_ID_HEADER = "x-request-id"
INVALID_FIELD_TRAILER = "x-invalid-field"
STATUS_DETAILS_TRAILER = "grpc-status-details-bin"
REQUEST_ID_FIELD = "request_id"
ROUTER_SERVICE_PREFIX = "/grpc_router.v1.RouterService/"
# Intercepted calls outside `server.max_concurrent_rpcs` (and readiness): cheap, and needed
# most when the server is busy. Health and reflection are not intercepted at all.
UNLIMITED_METHODS = frozenset({ROUTER_SERVICE_PREFIX + "ListRoutes"})
# Probes and tooling; they get no summary line.
_QUIET_PREFIXES = ("/grpc.health.", "/grpc.reflection.")
# What a request id (and any other value this server puts into metadata) may hold.
_PRINTABLE_ASCII = re.compile(r"[\x21-\x7e]+")

_log = logs.get_logger("grpc_router.call")


class ShuttingDown(RouterError):
    """The call did not finish within `server.grace_s` of SIGTERM (UNAVAILABLE: retry)."""


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message of an exception."""
    if isinstance(error, InvalidArgument):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error) or "engine queue full, retry later"
    if isinstance(error, EngineUnavailable):
        return grpc.StatusCode.UNAVAILABLE, str(error) or "engine unavailable"
    if isinstance(error, UpstreamError | ShuttingDown):
        return grpc.StatusCode.UNAVAILABLE, str(error)
    if isinstance(error, ArtifactError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(error)
    if isinstance(error, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
    if isinstance(error, RouterError):
        return grpc.StatusCode.INTERNAL, str(error)
    return grpc.StatusCode.INTERNAL, "internal error"


def metadata_safe(value: str) -> bool:
    """Whether `value` may go into (ASCII) metadata as it is: printable, no space, CR or LF."""
    return bool(_PRINTABLE_ASCII.fullmatch(value))


def check_request_id(value: str, limit: int, source: str = REQUEST_ID_FIELD) -> str:
    """`value` if it is a usable request id (1 to `limit` printable ASCII characters, no
    spaces); otherwise InvalidArgument naming `request_id`."""
    if len(value) > limit:
        raise InvalidArgument(
            REQUEST_ID_FIELD,
            f"{source} has {len(value)} characters; the limit is {limit} "
            "(limits.max_request_id_chars)",
        )
    if not metadata_safe(value):
        raise InvalidArgument(
            REQUEST_ID_FIELD,
            f"{source} must be printable ASCII (0x21-0x7E): no spaces, control characters "
            "or non-ASCII",
        )
    return value


def bad_request_details(error: InvalidArgument) -> bytes:
    """The `grpc-status-details-bin` trailer of an INVALID_ARGUMENT: a `google.rpc.Status`
    carrying one `google.rpc.BadRequest` field violation."""
    violation = error_details_pb2.BadRequest.FieldViolation(
        field=error.field, description=error.message
    )
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=str(error), details=[detail])
    return bytes(status.SerializeToString())


class Calls:
    """The intercepted calls in flight. Routing calls (every intercepted method but ListRoutes)
    count against `server.max_concurrent_rpcs` once their request has arrived and parsed;
    `on_change` runs whenever that count moves (readiness). At shutdown the server waits for
    them (`wait_idle`), then ends the rest UNAVAILABLE (`interrupt_all`)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.routing = 0
        self.draining = False
        self.on_change: Callable[[], None] = lambda: None
        self._live: set[_Call] = set()
        self._idle: asyncio.Event | None = None

    @property
    def saturated(self) -> bool:
        return self.limit is not None and self.routing >= self.limit

    def __len__(self) -> int:
        return len(self._live)

    def _admit(self) -> None:
        if self.draining:  # a call that slipped in as the drain began: retry elsewhere
            raise ShuttingDown("server shutting down; retry")
        if self.limit is not None and self.routing >= self.limit:
            raise Overloaded(
                f"server.max_concurrent_rpcs ({self.limit}) routing calls in flight; retry later"
            )
        self.routing += 1
        self.on_change()

    def _release(self) -> None:
        self.routing -= 1
        self.on_change()

    def _enter(self, call: _Call) -> None:
        self._live.add(call)

    def _leave(self, call: _Call) -> None:
        self._live.discard(call)
        if not self._live and self._idle is not None:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> None:
        """Until no intercepted call is in flight, or `timeout_s`."""
        self._idle = asyncio.Event()
        if not self._live:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)

    async def interrupt_all(self) -> int:
        """End every call still in flight UNAVAILABLE and wait (briefly) for them to go.
        Returns how many were ended."""
        self.draining = True
        late = list(self._live)
        for call in late:
            call.interrupt()
        await self.wait_idle(_INTERRUPT_WAIT_S)
        return len(late)


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def loggable(error: BaseException, message: str, log_content: bool) -> str:
    """What the call log says of an error: the client's message, unless it may hold content
    (a client's field value, an upstream's error body) and `logging.log_content` is off."""
    if log_content:
        return message
    if isinstance(error, InvalidArgument):  # the values it quotes are the client's
        return _QUOTED.sub("'…'", message)
    log_message = getattr(error, "log_message", None)  # DispatchFailed: no upstream bodies
    return log_message if isinstance(log_message, str) else message


class _Call:
    """Bookkeeping of one call: context, timing, status, summary line, admission, drain."""

    def __init__(
        self,
        method: str,
        metadata: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        calls: Calls,
        limits: LimitsConfig,
        log_content: bool = False,
    ) -> None:
        self.method = method
        self.log_content = log_content
        self.log_error = ""
        self.context = context
        self.calls = calls
        self.quiet = method.startswith(_QUIET_PREFIXES)
        self.header_error: InvalidArgument | None = None
        rid = ""
        for key, value in metadata or ():
            if key == REQUEST_ID_HEADER and isinstance(value, str) and value:
                try:
                    rid = check_request_id(
                        value, limits.max_request_id_chars, f"the {REQUEST_ID_HEADER} header"
                    )
                except InvalidArgument as e:
                    rid, self.header_error = "", e
        self.fields = logs.start_call(rid or uuid.uuid4().hex)
        self.start = time.perf_counter()
        self.code = grpc.StatusCode.OK
        self.error = ""
        self.admitted = False
        self.interrupted = False
        # Whether the task is inside the handler (or parsing), where it may be cancelled; a
        # streaming call is outside while gRPC sends a message.
        self.in_handler = True
        self.task = asyncio.current_task()
        metrics.IN_FLIGHT.labels(method).inc()

    async def __aenter__(self) -> _Call:
        self.calls._enter(self)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, error: BaseException | None, tb: object
    ) -> bool:
        cancelled = isinstance(error, asyncio.CancelledError | GeneratorExit)
        try:
            if self.interrupted and isinstance(error, asyncio.CancelledError):
                # Our own drain cancelled the handler: answer UNAVAILABLE, which clients retry.
                if self.task is not None:
                    self.task.uncancel()
                cancelled, error = False, ShuttingDown(_SHUTDOWN_MESSAGE)
            elif self.interrupted and isinstance(error, GeneratorExit):
                # The stream was closed under us: no status can be sent any more, but the line
                # and the metric still say why.
                cancelled = False
                self.code, self.error = grpc.StatusCode.UNAVAILABLE, _SHUTDOWN_MESSAGE
            if error is not None and not cancelled and not isinstance(error, _NO_STATUS):
                await self.fail(error, self.context)  # raises AbortError
        finally:
            self.finish(self.context, cancelled)
        return False

    def enter(self, request: Any, parse: Parse | None) -> Any:
        """The entry every wrapped handler shares, in this order: reject a bad request id
        header (RouterService only), parse the request (unless gRPC did), then take a routing
        slot (ListRoutes takes none); returns the request the handler gets. Its errors go to
        `__aexit__`, which answers them, and `finish` releases the slot only if it was taken."""
        if self.header_error is not None and self.method.startswith(ROUTER_SERVICE_PREFIX):
            raise self.header_error
        if parse is not None:
            request = parse(request)
        if self.method not in UNLIMITED_METHODS:
            self.calls._admit()
            self.admitted = True
        return request

    def interrupt(self) -> None:
        """End the call UNAVAILABLE: at once where it waits in its handler, else as soon as
        gRPC hands control back."""
        if self.interrupted:
            return
        self.interrupted = True
        if self.in_handler and self.task is not None and not self.task.done():
            self.task.cancel()

    def resume(self) -> None:
        """Back in the handler after a streamed message was sent."""
        self.in_handler = True
        if self.interrupted:
            raise ShuttingDown(_SHUTDOWN_MESSAGE)

    async def fail(self, error: BaseException, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.code, self.error = status_for(error)
        self.log_error = loggable(error, self.error, self.log_content)
        if self.code is grpc.StatusCode.INTERNAL:
            _log.exception("unhandled error", method=self.method)
        trailers: list[tuple[str, str | bytes]] = []
        if isinstance(error, InvalidArgument):
            trailers.append((STATUS_DETAILS_TRAILER, bad_request_details(error)))
            if metadata_safe(error.field):
                trailers.append((INVALID_FIELD_TRAILER, error.field))
        rid = logs.current_request_id()
        if metadata_safe(rid):
            trailers.append((REQUEST_ID_HEADER, rid))
        await context.abort(self.code, self.error, trailing_metadata=tuple(trailers))

    def finish(self, context: grpc.aio.ServicerContext[Any, Any], cancelled: bool) -> None:
        self.calls._leave(self)
        if self.admitted:
            self.admitted = False
            self.calls._release()
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
        extra = {"error": self.log_error or self.error} if self.error else {}
        getattr(_log, level)(
            "call", method=self.method, status=self.code.name, total_ms=ms, **self.fields, **extra
        )


# Exceptions after which no status is to be sent: already sent, or the stream is closed.
_NO_STATUS = (grpc.aio.AbortError, GeneratorExit)
# After the grace period, how long interrupted calls get to send their UNAVAILABLE.
_INTERRUPT_WAIT_S = 5.0
_SHUTDOWN_MESSAGE = "server shutting down: the call did not finish within server.grace_s; retry"

Parse = Callable[[Any], Any]


@functools.lru_cache(maxsize=64)
def _request_type(method: str) -> str:
    """`grpc_router.v1.RouteRequest` for `/grpc_router.v1.RouterService/Route`."""
    try:
        found = descriptor_pool.Default().FindMethodByName(method.lstrip("/").replace("/", "."))
    except KeyError:
        return "request"
    return str(found.input_type.full_name)


def _parser(method: str, deserializer: Parse | None) -> Parse | None:
    """The request parser of a unary-request method, raising InvalidArgument (field `request`)
    for bytes that are not a valid message; None leaves parsing to gRPC."""
    if deserializer is None:
        return None
    name = f"{_request_type(method)} message"

    def parse(raw: Any) -> Any:
        try:
            return deserializer(raw)
        except (DecodeError, UnicodeDecodeError):
            raise InvalidArgument("request", f"not a valid {name}") from None

    return parse


_Handler = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Any]


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every RouterService (and ext_proc) handler. `limits` reads the live
    `limits` section (a SIGHUP may change it)."""

    def __init__(
        self,
        calls: Calls,
        limits: Callable[[], LimitsConfig],
        log_content: Callable[[], bool] = lambda: False,
    ) -> None:
        self.calls = calls
        self._limits = limits
        self._log_content = log_content

    def _call(
        self, method: str, metadata: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> _Call:
        return _Call(method, metadata, context, self.calls, self._limits(), self._log_content())

    def _unary_response(
        self,
        behavior: Callable[[Any, Any], Awaitable[Any]],
        method: str,
        metadata: Any,
        parse: Parse | None,
    ) -> _Handler:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async with self._call(method, metadata, context) as call:
                return await behavior(call.enter(request, parse), context)

        return wrapper

    def _stream_response(
        self,
        behavior: Callable[[Any, Any], AsyncIterator[Any]],
        method: str,
        metadata: Any,
        parse: Parse | None,
    ) -> _Handler:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async with self._call(method, metadata, context) as call:
                result = behavior(call.enter(request, parse), context)
                if inspect.isawaitable(result):  # handlers that use context.write()
                    await result
                else:
                    async for item in result:
                        call.in_handler = False
                        yield item
                        call.resume()

        return wrapper

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
        deserializer = handler.request_deserializer
        parse: Parse | None = None
        if not handler.request_streaming:
            # gRPC hands the raw bytes over and the wrapper parses them, so that a request
            # that is not a valid message is INVALID_ARGUMENT, logged and counted.
            parse, deserializer = _parser(method, deserializer), None
        kw: dict[str, Any] = {
            "request_deserializer": deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary_response(handler.unary_unary, method, md, parse), **kw
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._unary_response(handler.stream_unary, method, md, None), **kw
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._stream_response(cast(Any, handler.unary_stream), method, md, parse), **kw
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                self._stream_response(cast(Any, handler.stream_stream), method, md, None), **kw
            )
        return handler
