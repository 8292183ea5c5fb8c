"""Protobuf <-> plain types: the one place that maps the RouterService messages onto
`grpc_router.types`, used by the servicer, the CLI and the evaluator."""

from __future__ import annotations

from collections.abc import Sequence

from grpc_router.errors import InvalidArgument
from grpc_router.types import (
    DecisionSource,
    FallbackReason,
    Message,
    MessageKind,
    Role,
    RouteOutcome,
    RouteRequest,
    RouteSpec,
    SessionStatus,
)
from grpc_router.v1 import router_pb2 as pb

ROLE_FROM_PB: dict[pb.Role.ValueType, Role] = {
    pb.ROLE_USER: Role.USER,
    pb.ROLE_ASSISTANT: Role.ASSISTANT,
    pb.ROLE_SYSTEM: Role.SYSTEM,
    pb.ROLE_DEVELOPER: Role.DEVELOPER,
    pb.ROLE_TOOL: Role.TOOL,
}
ROLE_TO_PB: dict[Role, pb.Role.ValueType] = {role: value for value, role in ROLE_FROM_PB.items()}

KIND_FROM_PB: dict[pb.MessageKind.ValueType, MessageKind] = {
    pb.MESSAGE_KIND_UNSPECIFIED: MessageKind.TEXT,
    pb.MESSAGE_KIND_TOOL_CALL: MessageKind.TOOL_CALL,
    pb.MESSAGE_KIND_TOOL_RESULT: MessageKind.TOOL_RESULT,
}
KIND_TO_PB: dict[MessageKind, pb.MessageKind.ValueType] = {k: v for v, k in KIND_FROM_PB.items()}
SOURCE_TO_PB: dict[DecisionSource, pb.DecisionSource.ValueType] = {
    DecisionSource.ENGINE: pb.DECISION_SOURCE_ENGINE,
    DecisionSource.CACHE: pb.DECISION_SOURCE_CACHE,
    DecisionSource.SESSION: pb.DECISION_SOURCE_SESSION,
}
SESSION_TO_PB: dict[SessionStatus, pb.SessionStatus.ValueType] = {
    SessionStatus.NONE: pb.SESSION_STATUS_UNSPECIFIED,
    SessionStatus.NEW: pb.SESSION_STATUS_NEW,
    SessionStatus.CONTINUED: pb.SESSION_STATUS_CONTINUED,
    SessionStatus.EXPIRED: pb.SESSION_STATUS_EXPIRED,
}
FALLBACK_TO_PB: dict[FallbackReason, pb.FallbackReason.ValueType] = {
    FallbackReason.NONE: pb.FALLBACK_REASON_UNSPECIFIED,
    FallbackReason.OTHER: pb.FALLBACK_REASON_OTHER,
    FallbackReason.BELOW_THRESHOLD: pb.FALLBACK_REASON_BELOW_THRESHOLD,
    FallbackReason.ENGINE_ERROR: pb.FALLBACK_REASON_ENGINE_ERROR,
    FallbackReason.ENGINE_TIMEOUT: pb.FALLBACK_REASON_ENGINE_TIMEOUT,
    FallbackReason.OVERLOADED: pb.FALLBACK_REASON_OVERLOADED,
    FallbackReason.UNKNOWN_ROUTE: pb.FALLBACK_REASON_UNKNOWN_ROUTE,
}


def messages_from_pb(
    messages: Sequence[pb.Message], field: str = "messages"
) -> tuple[Message, ...]:
    """Plain messages; an unset or unknown role is an InvalidArgument naming `field[i].role`."""
    out: list[Message] = []
    for i, m in enumerate(messages):
        role = ROLE_FROM_PB.get(m.role)
        if role is None:
            raise InvalidArgument(f"{field}[{i}].role", f"unknown or unset role {m.role}")
        kind = KIND_FROM_PB.get(m.kind)
        if kind is None:
            raise InvalidArgument(f"{field}[{i}].kind", f"unknown message kind {m.kind}")
        if role is Role.TOOL:
            kind = MessageKind.TOOL_RESULT
        out.append(Message(role, m.content, kind))
    return tuple(out)


def messages_to_pb(messages: Sequence[Message]) -> list[pb.Message]:
    return [
        pb.Message(role=ROLE_TO_PB[m.role], content=m.content, kind=KIND_TO_PB[m.kind])
        for m in messages
    ]


def routes_from_pb(routes: Sequence[pb.RouteDefinition]) -> tuple[RouteSpec, ...]:
    return tuple(RouteSpec(r.name, r.description, tuple(r.examples)) for r in routes)


def routes_to_pb(routes: Sequence[RouteSpec]) -> list[pb.RouteDefinition]:
    return [
        pb.RouteDefinition(name=r.name, description=r.description, examples=r.examples)
        for r in routes
    ]


def route_request_from_pb(req: pb.RouteRequest, request_id: str) -> RouteRequest:
    """The plain request of a Route call (a Dispatch call carries one)."""
    routes = routes_from_pb(req.routes) if req.routes else None
    return RouteRequest(
        messages_from_pb(req.messages),
        routes,
        request_id,
        full_scores=not req.skip_scores,
        session_id=req.session_id,
    )


def route_response_to_pb(
    outcome: RouteOutcome, request_id: str, total_ms: float
) -> pb.RouteResponse:
    """The wire form of a routing outcome."""
    t = outcome.timings_ms
    return pb.RouteResponse(
        route=outcome.route,
        model=outcome.model,
        confidence=outcome.confidence,
        scores=[pb.RouteScore(route=k, probability=v) for k, v in outcome.scores.items()],
        fallback_used=outcome.fallback_used,
        fallback_reason=FALLBACK_TO_PB[outcome.fallback_reason],
        fallback_detail=outcome.fallback_detail,
        engine=outcome.engine,
        timings=pb.Timings(
            queue_ms=t.get("queue", 0.0), engine_ms=t.get("engine", 0.0), total_ms=total_ms
        ),
        request_id=request_id,
        engine_route=outcome.engine_route,
        decision_source=SOURCE_TO_PB[outcome.source],
        pinned=outcome.pinned,
        switched=outcome.switched,
        session_status=SESSION_TO_PB[outcome.session_status],
    )
