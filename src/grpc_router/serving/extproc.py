"""Envoy External Processing (ext_proc v3) servicer: routes LLM calls in a mesh.

Envoy opens one `Process` stream per HTTP request and sends its phases in order: request headers,
then (BUFFERED mode) the whole request body with end_of_stream, then any response phases. On an
OpenAI Chat Completions, OpenAI Responses or Anthropic Messages call this servicer parses the
messages, asks the router (with the session id of the `session_header` request header, if any),
and answers the body phase with header mutations plus `clear_route_cache`, so Envoy re-picks the
route (and cluster) by `x-router-model`. Everything else is answered CONTINUE, untouched. This
module is transport only: decisions come from the core `Router`; body parsing lives in
`chatparse`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from prometheus_client import Counter, Histogram

from grpc_router.core.router import Router
from grpc_router.errors import InvalidArgument, Overloaded, RouterError
from grpc_router.observability import tracing
from grpc_router.serving.chatparse import ChatDialect, parse_chat
from grpc_router.settings.extproc import ExtProcSettings
from grpc_router.types import Message, MessageKind, Role, RouteOutcome, RouteRequest

__all__ = [
    "SERVICE_NAME",
    "ExtProcServicer",
    "ExtProcSettings",
    "register_ext_proc",
]

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name

log = structlog.get_logger(__name__)

# Module-level so that they are registered once per process, however many servers tests start.
EXTPROC_REQUESTS = Counter(
    "grpc_router_extproc_requests_total",
    "ext_proc streams (HTTP requests) by outcome.",
    ["outcome"],
)
EXTPROC_PASS_THROUGH = Counter(
    "grpc_router_extproc_pass_through_total",
    "HTTP requests passed through untouched, by reason.",
    ["reason"],
)
EXTPROC_FAILURES = Counter(
    "grpc_router_extproc_failures_total",
    "Chat requests whose routing failed, by reason and the failure mode applied.",
    ["reason", "failure_mode"],
)
EXTPROC_ROUTE_SECONDS = Histogram(
    "grpc_router_extproc_route_seconds",
    "Time from the buffered body to the routing answer.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


# Beyond route_timeout_s (which the router enforces on its engine), a guard against a hung router.
_GUARD_S = 1.0


_LEADING_ROLES = frozenset({Role.SYSTEM, Role.DEVELOPER})
_CLIP_MARK = "\n…\n"


def _clip(text: str, limit: int) -> str:
    """At most `limit` characters: the head and the tail (a question often ends a long paste)."""
    if limit <= len(_CLIP_MARK):
        return text[:limit]
    keep = limit - len(_CLIP_MARK)
    return text[: keep - keep // 2] + _CLIP_MARK + text[len(text) - keep // 2 :]


_TRACE_HEADERS = ("traceparent", "tracestate")


@dataclass(slots=True)
class _Stream:
    """What one Process stream (one HTTP request) has learnt so far."""

    dialect: ChatDialect | None = None
    request_id: str = ""
    session_id: str = ""
    path: str = ""
    trace_headers: dict[str, str] = field(default_factory=dict)
    """The request's W3C trace context (`traceparent`, `tracestate`), continued by the
    routing span."""
    done: bool = False
    """Decided (routed, passed through or failed): later phases only CONTINUE."""


class _Failure(Exception):
    def __init__(self, reason: str, status: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status
        self.message = message


def _header_value(header: base_pb2.HeaderValue) -> str:
    # Envoy sends raw_value (bytes) by default since 1.28, value before that.
    if header.raw_value:
        return bytes(header.raw_value).decode("utf-8", errors="replace")
    return str(header.value)


def _set_headers(pairs: Iterable[tuple[str, str]]) -> pb.HeaderMutation:
    return pb.HeaderMutation(
        set_headers=[
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=key, raw_value=value.encode()),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            )
            for key, value in pairs
        ]
    )


def _continue(phase: str) -> pb.ProcessingResponse:
    """CONTINUE, untouched, for `phase` (a ProcessingRequest oneof name)."""
    if phase in ("request_headers", "response_headers"):
        return pb.ProcessingResponse(**{phase: pb.HeadersResponse(response=pb.CommonResponse())})
    if phase in ("request_body", "response_body"):
        return pb.ProcessingResponse(**{phase: pb.BodyResponse(response=pb.CommonResponse())})
    return pb.ProcessingResponse(**{phase: pb.TrailersResponse()})


_SKIP_REST = processing_mode_pb2.ProcessingMode(
    request_body_mode=processing_mode_pb2.ProcessingMode.NONE,
    request_trailer_mode=processing_mode_pb2.ProcessingMode.SKIP,
    response_header_mode=processing_mode_pb2.ProcessingMode.SKIP,
    response_body_mode=processing_mode_pb2.ProcessingMode.NONE,
    response_trailer_mode=processing_mode_pb2.ProcessingMode.SKIP,
)


def _latest_user_text(messages: list[Message]) -> int:
    """Index of the latest user message of kind TEXT; -1 when there is none."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].role is Role.USER and messages[i].kind is MessageKind.TEXT:
            return i
    return -1


class ExtProcServicer(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """envoy.service.ext_proc.v3.ExternalProcessor over the core Router."""

    def __init__(self, router: Router, settings: ExtProcSettings) -> None:
        self._router = router
        self._settings = s = settings
        self._paths: dict[str, ChatDialect] = {p: ChatDialect.OPENAI for p in settings.openai_paths}
        self._paths.update({p: ChatDialect.ANTHROPIC for p in settings.anthropic_paths})
        self._paths.update({p: ChatDialect.RESPONSES for p in settings.responses_paths})
        names = (s.route_header, s.model_header, s.confidence_header, s.fallback_header)
        self._router_headers = names if s.strip_client_headers else ()

    async def Process(
        self,
        request_iterator: AsyncIterator[pb.ProcessingRequest],
        context: grpc.aio.ServicerContext[pb.ProcessingRequest, pb.ProcessingResponse],
    ) -> AsyncIterator[pb.ProcessingResponse]:
        stream = _Stream()
        try:
            async for request in request_iterator:
                phase = request.WhichOneof("request")
                if phase == "request_headers":
                    yield self._on_request_headers(request.request_headers, stream)
                elif phase == "request_body":
                    yield await self._on_request_body(request.request_body, stream)
                elif phase is None:
                    stream.done = True
                    EXTPROC_REQUESTS.labels("protocol_error").inc()
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, "ProcessingRequest: no phase is set"
                    )
                else:
                    yield _continue(phase)
        finally:
            # Envoy ended the stream before this request was answered: the HTTP client went
            # away. gRPC shows a reset either as CancelledError or as a plain end of the
            # request stream, so both count here.
            if not stream.done:
                EXTPROC_REQUESTS.labels("cancelled").inc()
                log.info("extproc.cancelled", path=stream.path, request_id=stream.request_id)

    # -- phases ---------------------------------------------------------------------------

    def _on_request_headers(
        self, headers: pb.HttpHeaders, stream: _Stream
    ) -> pb.ProcessingResponse:
        values: dict[str, str] = {}
        for header in headers.headers.headers:
            values.setdefault(header.key.lower(), _header_value(header))
        spoofed = [h for h in self._router_headers if h in values]
        stream.path = values.get(":path", "").split("?", 1)[0]
        stream.request_id = values.get("x-request-id", "")
        # Passed as is: the router validates it (an invalid id is an invalid request).
        stream.session_id = values.get(self._settings.session_header, "")
        stream.trace_headers = {k: values[k] for k in _TRACE_HEADERS if k in values}
        dialect = self._paths.get(stream.path)
        reason = self._headers_pass_reason(dialect, values, end_of_stream=headers.end_of_stream)
        if reason is not None:
            response = self._pass_through(stream, reason, "request_headers")
            if self._settings.skip_unused_phases:
                response.mode_override.CopyFrom(_SKIP_REST)
        else:
            stream.dialect = dialect
            response = _continue("request_headers")
        if spoofed:
            common = response.request_headers.response
            common.header_mutation.remove_headers.extend(spoofed)
            common.clear_route_cache = True  # the route was matched on the spoofed headers
            log.info("extproc.stripped_client_headers", headers=spoofed, path=stream.path)
        return response

    def _headers_pass_reason(
        self, dialect: ChatDialect | None, values: Mapping[str, str], *, end_of_stream: bool
    ) -> str | None:
        if dialect is None or values.get(":method", "").upper() != "POST":
            return "not_chat"
        media_type = values.get("content-type", "application/json").split(";", 1)[0].strip()
        if media_type.lower() != "application/json" and not media_type.lower().endswith("+json"):
            return "not_json"
        length = values.get("content-length", "")
        if length.isdigit() and int(length) > self._settings.max_body_bytes:
            return "too_large"
        if end_of_stream:
            return "no_body"
        return None

    async def _on_request_body(self, body: pb.HttpBody, stream: _Stream) -> pb.ProcessingResponse:
        if stream.done:
            return _continue("request_body")
        if stream.dialect is None:
            # Headers were never seen (request_header_mode SKIP): the path is unknown.
            return self._pass_through(stream, "no_headers")
        if not body.end_of_stream:
            # STREAMED, or BUFFERED_PARTIAL over Envoy's buffer: headers may already be upstream.
            return self._pass_through(stream, "partial_body")
        raw = bytes(body.body)
        if len(raw) > self._settings.max_body_bytes:
            return self._pass_through(stream, "too_large")
        try:
            document = json.loads(raw)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            return self._pass_through(stream, "not_json")
        if not isinstance(document, dict):
            return self._pass_through(stream, "not_json")
        try:
            messages = parse_chat(stream.dialect, document)
        except InvalidArgument as exc:
            return self._pass_through(stream, "invalid_chat", field=exc.field)
        request = RouteRequest(
            messages=self._fit(messages),
            request_id=stream.request_id,
            session_id=stream.session_id,
        )
        started = time.perf_counter()
        try:
            with (
                tracing.continue_from(stream.trace_headers),
                tracing.tracer().start_as_current_span(
                    "extproc.route", attributes={"http.path": stream.path}
                ),
            ):
                outcome = await self._route(request)
        except _Failure as failure:
            return self._on_failure(stream, failure)
        finally:
            EXTPROC_ROUTE_SECONDS.observe(time.perf_counter() - started)
        # Set only once answered, so that a cancel while routing counts as cancelled.
        stream.done = True
        if outcome.fallback_reason.engine_failed:
            # The router failed open onto its default route; closed mode still rejects.
            engine_failure = _Failure(
                outcome.fallback_reason,
                self._settings.failure_status,
                f"engine failed ({outcome.fallback_reason})",
            )
            if self._settings.failure_mode == "closed":
                return self._on_failure(stream, engine_failure)
            self._count_failure(stream, engine_failure)
            return self._routed_response(document, outcome)
        EXTPROC_REQUESTS.labels("routed").inc()
        log.debug(
            "extproc.routed",
            path=stream.path,
            request_id=stream.request_id,
            route=outcome.route,
            model=outcome.model,
            fallback=outcome.fallback_reason,
            source=outcome.source,
            session=outcome.session_status,
            pinned=outcome.pinned,
        )
        return self._routed_response(document, outcome)

    # -- helpers --------------------------------------------------------------------------

    def _pass_through(
        self, stream: _Stream, reason: str, phase: str = "request_body", **details: Any
    ) -> pb.ProcessingResponse:
        """Count and log a pass-through; answer `phase` with CONTINUE."""
        stream.done = True
        EXTPROC_REQUESTS.labels("pass_through").inc()
        EXTPROC_PASS_THROUGH.labels(reason).inc()
        log.info(
            "extproc.pass_through",
            reason=reason,
            path=stream.path,
            request_id=stream.request_id,
            **details,
        )
        return _continue(phase)

    async def _route(self, request: RouteRequest) -> RouteOutcome:
        try:
            limit = self._settings.route_timeout_s
            return await asyncio.wait_for(
                self._router.route(request, timeout_s=limit), timeout=limit + _GUARD_S
            )
        except InvalidArgument as exc:
            raise _Failure("invalid_argument", 400, str(exc)) from exc
        except Overloaded as exc:
            raise _Failure("overloaded", self._settings.failure_status, str(exc)) from exc
        except TimeoutError as exc:
            message = f"router did not answer within {self._settings.route_timeout_s}s"
            raise _Failure("timeout", self._settings.failure_status, message) from exc
        except RouterError as exc:
            raise _Failure("engine_error", self._settings.failure_status, str(exc)) from exc
        except Exception as exc:  # a bug must not take Envoy's stream down with it
            log.exception("extproc.router_crashed", request_id=request.request_id)
            raise _Failure("internal", self._settings.failure_status, repr(exc)) from exc

    def _count_failure(self, stream: _Stream, failure: _Failure) -> None:
        stream.done = True
        mode = self._settings.failure_mode
        EXTPROC_REQUESTS.labels("failed").inc()
        EXTPROC_FAILURES.labels(failure.reason, mode).inc()
        log.warning(
            "extproc.route_failed",
            reason=failure.reason,
            failure_mode=mode,
            error=failure.message,
            path=stream.path,
            request_id=stream.request_id,
        )

    def _on_failure(self, stream: _Stream, failure: _Failure) -> pb.ProcessingResponse:
        self._count_failure(stream, failure)
        if self._settings.failure_mode == "open":
            return _continue("request_body")
        error = {
            "error": {
                "type": "router_error",
                "code": failure.reason,
                "message": f"grpc-router could not route this request: {failure.message}",
            }
        }
        return pb.ProcessingResponse(
            immediate_response=pb.ImmediateResponse(
                status=http_status_pb2.HttpStatus(code=failure.status),
                headers=_set_headers([("content-type", "application/json")]),
                body=json.dumps(error).encode(),
                details=f"grpc_router_{failure.reason}",
            )
        )

    def _routed_response(
        self, document: dict[str, Any], outcome: RouteOutcome
    ) -> pb.ProcessingResponse:
        s = self._settings
        headers = [
            (s.route_header, outcome.route),
            (s.model_header, outcome.model),
            (s.confidence_header, f"{outcome.confidence:.4f}"),
        ]
        if outcome.fallback_used:
            headers.append((s.fallback_header, outcome.fallback_reason or "true"))
        common = pb.CommonResponse(clear_route_cache=True)
        upstream = self._upstream_name(outcome.model)
        if s.rewrite_model and document.get("model") != upstream:
            document["model"] = upstream
            new_body = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
            common.body_mutation.body = new_body
            headers.append(("content-length", str(len(new_body))))
        common.header_mutation.CopyFrom(_set_headers(headers))
        return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))

    def _fit(self, messages: tuple[Message, ...]) -> tuple[Message, ...]:
        """Fit a conversation into the router's limits, as the engine trims its prompt: keep the
        leading system turns and the latest turns, clip over-long contents (head and tail).
        Agent conversations routinely exceed a gRPC caller's limits; HTTP callers cannot be
        asked to shorten them. The latest user text turn is always kept: an agent run can add
        more tool calls and results after it than the limit allows, and the router routes on
        the conversation up to that turn; then the latest turn before it and the latest tool
        traffic after it share the room."""
        limits = self._router.config.limits
        chars = limits.max_content_chars
        fitted = [
            m if len(m.content) <= chars else Message(m.role, _clip(m.content, chars), m.kind)
            for m in messages
        ]
        if len(fitted) <= limits.max_messages:
            return tuple(fitted)
        lead = 0
        while lead < len(fitted) and fitted[lead].role in _LEADING_ROLES:
            lead += 1
        lead = min(lead, limits.max_messages // 2)
        room = limits.max_messages - lead
        user = _latest_user_text(fitted)
        after = len(fitted) - 1 - user
        if user < lead or after < room:
            # The latest `room` turns include the latest user text turn (or there is none).
            return tuple(fitted[:lead] + fitted[len(fitted) - room :])
        tail = min(after, room // 2)
        head = room - tail  # >= 1: the user turn and the turns just before it
        kept_before = fitted[max(lead, user + 1 - head) : user + 1]
        kept_after = fitted[len(fitted) - tail :] if tail else []
        return tuple(fitted[:lead] + kept_before + kept_after)

    def _upstream_name(self, model_key: str) -> str:
        entry = self._router.config.models.get(model_key)
        return entry.model if entry is not None else model_key


def register_ext_proc(server: grpc.aio.Server, router: Router, settings: ExtProcSettings) -> None:
    """Add the ExternalProcessor service to `server` when `settings.enabled`; else do nothing.

    Call before `server.start()`. The server's own grpc.health.v1 service then answers the mesh's
    gRPC health checks and Kubernetes' gRPC probes on the same port.
    """
    if not settings.enabled:
        return
    pb_grpc.add_ExternalProcessorServicer_to_server(ExtProcServicer(router, settings), server)
    log.info(
        "extproc.registered",
        service=SERVICE_NAME,
        failure_mode=settings.failure_mode,
        rewrite_model=settings.rewrite_model,
    )
