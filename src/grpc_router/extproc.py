"""Envoy External Processing (ext_proc v3) servicer: routes OpenAI/Anthropic chat calls in a mesh.

Envoy opens one `Process` stream per HTTP request and sends its phases in order: request headers,
then (BUFFERED mode) the whole request body with end_of_stream, then any response phases. On a chat
call this servicer parses the messages, asks the router, and answers the body phase with header
mutations plus `clear_route_cache`, so Envoy re-picks the route (and cluster) by `x-router-model`.
Everything else is answered CONTINUE, untouched. This module is transport only: decisions come
from a `RouterLike`; body parsing lives in `chatparse`.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import grpc
import structlog
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from prometheus_client import Counter, Histogram
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from grpc_router.chatparse import ChatDialect, parse_chat
from grpc_router.errors import InvalidArgument, Overloaded, RouterError
from grpc_router.types import Message, Role, RouteOutcome, RouteRequest

__all__ = [
    "SERVICE_NAME",
    "ConfiguredRouter",
    "ExtProcServicer",
    "ExtProcSettings",
    "RouterLike",
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

# RFC 9110 token characters, lowercase (Envoy lowercases header names; HTTP/2 requires it).
_HEADER_NAME = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")


class ExtProcSettings(BaseModel):
    """The `ext_proc:` section of the config file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    """Serve envoy.service.ext_proc.v3.ExternalProcessor on the router's gRPC port."""
    route_header: str = "x-router-route"
    model_header: str = "x-router-model"
    confidence_header: str = "x-router-confidence"
    fallback_header: str = "x-router-fallback"
    """Set to the fallback reason when the router fell back; absent otherwise."""
    rewrite_model: bool = False
    """Rewrite the body's `model` field to the chosen model (and fix content-length)."""
    max_body_bytes: int = Field(default=1 << 20, gt=0)
    """Larger bodies pass through unrouted."""
    failure_mode: Literal["open", "closed"] = "open"
    """open: a failed routing lets the request through (unrouted, or onto the router's default
    route when the router itself failed open); closed: reject it with `failure_status`."""
    failure_status: int = Field(default=503, ge=400, le=599)
    """HTTP status of the rejection under failure_mode closed (invalid chats get 400)."""
    route_timeout_s: float = Field(default=4.0, gt=0)
    """Give up on the router after this; keep it below Envoy's `message_timeout`."""
    openai_paths: tuple[str, ...] = ("/v1/chat/completions",)
    anthropic_paths: tuple[str, ...] = ("/v1/messages",)
    strip_client_headers: bool = True
    """Remove the router's headers when a client sent them itself, so that a caller cannot
    pick the upstream by setting `x-router-model` (the only change made to a pass-through)."""
    skip_unused_phases: bool = True
    """Ask Envoy (mode_override; needs `allow_mode_override: true`) not to send the body or the
    response phases of a request that will pass through."""

    @field_validator("route_header", "model_header", "confidence_header", "fallback_header")
    @classmethod
    def _header_name(cls, value: str) -> str:
        if not _HEADER_NAME.fullmatch(value):
            raise ValueError("must be a lowercase HTTP header name (letters, digits, '-', ...)")
        return value

    @model_validator(mode="after")
    def _distinct(self) -> ExtProcSettings:
        names = [self.route_header, self.model_header, self.confidence_header]
        names.append(self.fallback_header)
        if len(set(names)) != len(names):
            raise ValueError(
                "route_header, model_header, confidence_header and fallback_header "
                "must be four different header names"
            )
        overlap = set(self.openai_paths) & set(self.anthropic_paths)
        if overlap:
            raise ValueError(f"{sorted(overlap)} listed as both openai_paths and anthropic_paths")
        return self

    @field_validator("openai_paths", "anthropic_paths")
    @classmethod
    def _paths(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for path in value:
            if not path.startswith("/") or "?" in path:
                raise ValueError(f"{path!r}: a path starts with '/' and has no query")
        return value


class RouterLike(Protocol):
    """What ext_proc needs from the core router (grpc_router.core.Router)."""

    async def route(
        self, request: RouteRequest, *, timeout_s: float | None = None
    ) -> RouteOutcome: ...


class _ModelEntry(Protocol):
    @property
    def model(self) -> str: ...


class _Limits(Protocol):
    @property
    def max_messages(self) -> int: ...

    @property
    def max_content_chars(self) -> int: ...


class _RouterConfig(Protocol):
    @property
    def models(self) -> Mapping[str, _ModelEntry]: ...

    @property
    def limits(self) -> _Limits: ...


@runtime_checkable
class ConfiguredRouter(RouterLike, Protocol):
    """A router that also exposes its config (grpc_router.core.Router does): the body rewrite
    then writes the model's upstream name (`models.<key>.model`) instead of its key, and long
    conversations are fitted to the router's limits instead of passing through."""

    @property
    def config(self) -> _RouterConfig: ...


# Router fallbacks that mean the engine failed (not that it chose the default route).
_ENGINE_FAILURES = frozenset({"engine_error", "engine_timeout", "overloaded"})
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


@dataclass(slots=True)
class _Stream:
    """What one Process stream (one HTTP request) has learnt so far."""

    dialect: ChatDialect | None = None
    request_id: str = ""
    path: str = ""
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


class ExtProcServicer(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """envoy.service.ext_proc.v3.ExternalProcessor over a RouterLike."""

    def __init__(self, router: RouterLike, settings: ExtProcSettings) -> None:
        self._router = router
        self._settings = s = settings
        self._paths: dict[str, ChatDialect] = {p: ChatDialect.OPENAI for p in settings.openai_paths}
        self._paths.update({p: ChatDialect.ANTHROPIC for p in settings.anthropic_paths})
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
        request = RouteRequest(messages=self._fit(messages), request_id=stream.request_id)
        started = time.perf_counter()
        try:
            outcome = await self._route(request)
        except _Failure as failure:
            return self._on_failure(stream, failure)
        finally:
            EXTPROC_ROUTE_SECONDS.observe(time.perf_counter() - started)
        # Set only once answered, so that a cancel while routing counts as cancelled.
        stream.done = True
        if outcome.fallback_reason in _ENGINE_FAILURES:
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
        asked to shorten them."""
        if not isinstance(self._router, ConfiguredRouter):
            return messages
        limits = self._router.config.limits
        chars = limits.max_content_chars
        fitted = [
            m if len(m.content) <= chars else Message(m.role, _clip(m.content, chars))
            for m in messages
        ]
        if len(fitted) > limits.max_messages:
            lead = 0
            while lead < len(fitted) and fitted[lead].role in _LEADING_ROLES:
                lead += 1
            lead = min(lead, limits.max_messages // 2)
            fitted = fitted[:lead] + fitted[len(fitted) - (limits.max_messages - lead) :]
        return tuple(fitted)

    def _upstream_name(self, model_key: str) -> str:
        if isinstance(self._router, ConfiguredRouter):
            entry = self._router.config.models.get(model_key)
            if entry is not None:
                return entry.model
        return model_key


def register_ext_proc(
    server: grpc.aio.Server, router: RouterLike, settings: ExtProcSettings
) -> None:
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
