"""Request validation: every limit and rule a routing or dispatch request must meet, each
failure an InvalidArgument naming the offending field."""

from __future__ import annotations

from collections.abc import Sequence

from grpc_router.dispatch.upstream import GenerationParams
from grpc_router.errors import InvalidArgument
from grpc_router.settings import ROUTE_NAME_RE, AppConfig
from grpc_router.types import OTHER_ROUTE, Role, RouteRequest, RouteSpec

MAX_STOP_SEQUENCES = 4


def validate_request(request: RouteRequest, cfg: AppConfig) -> None:
    """Raise InvalidArgument naming the first offending field of a routing request."""
    lim = cfg.limits
    msgs = request.messages
    if not msgs:
        raise InvalidArgument("messages", "at least one message is required")
    if len(msgs) > lim.max_messages:
        raise InvalidArgument(
            "messages", f"{len(msgs)} messages exceed the limit of {lim.max_messages}"
        )
    for i, m in enumerate(msgs):
        if not isinstance(m.role, Role):
            raise InvalidArgument(f"messages[{i}].role", f"unknown role {m.role!r}")
        if len(m.content) > lim.max_content_chars:
            raise InvalidArgument(
                f"messages[{i}].content",
                f"{len(m.content)} characters exceed the limit of {lim.max_content_chars}",
            )
    if not any(m.role is Role.USER and m.content.strip() for m in msgs):
        raise InvalidArgument("messages", "at least one non-empty user message is required")
    if request.routes is not None:
        _validate_routes(request.routes, cfg)
    if request.session_id:
        _validate_session_id(request.session_id, cfg.session.max_id_chars)


def _validate_routes(routes: Sequence[RouteSpec], cfg: AppConfig) -> None:
    lim = cfg.limits
    if not routes:
        raise InvalidArgument("routes", "an explicit route set must not be empty")
    if len(routes) > lim.max_routes:
        raise InvalidArgument(
            "routes", f"{len(routes)} routes exceed the limit of {lim.max_routes}"
        )
    seen: set[str] = set()
    for i, r in enumerate(routes):
        if not ROUTE_NAME_RE.match(r.name):
            raise InvalidArgument(
                f"routes[{i}].name", f"{r.name!r} must match {ROUTE_NAME_RE.pattern}"
            )
        if r.name == OTHER_ROUTE:
            raise InvalidArgument(f"routes[{i}].name", f"'{OTHER_ROUTE}' is reserved")
        if r.name in seen:
            raise InvalidArgument(f"routes[{i}].name", f"duplicate route name {r.name!r}")
        seen.add(r.name)
        if not r.description.strip():
            raise InvalidArgument(f"routes[{i}].description", "must not be empty")
        if len(r.examples) > lim.max_examples:
            raise InvalidArgument(
                f"routes[{i}].examples",
                f"{len(r.examples)} examples exceed the limit of {lim.max_examples}",
            )
        for j, example in enumerate(r.examples):
            if len(example) > lim.max_example_chars:
                raise InvalidArgument(
                    f"routes[{i}].examples[{j}]",
                    f"{len(example)} characters exceed the limit of {lim.max_example_chars}",
                )
        if len(r.description) > lim.max_description_chars:
            raise InvalidArgument(
                f"routes[{i}].description",
                f"{len(r.description)} characters exceed the limit of {lim.max_description_chars}",
            )


def _validate_session_id(session_id: str, max_chars: int) -> None:
    if len(session_id) > max_chars:
        raise InvalidArgument(
            "session_id", f"{len(session_id)} characters exceed the limit of {max_chars}"
        )
    if not all("!" <= c <= "~" for c in session_id):
        raise InvalidArgument("session_id", "must be printable ASCII without spaces (0x21-0x7E)")


def validate_params(p: GenerationParams) -> None:
    if p.temperature is not None and not 0.0 <= p.temperature <= 2.0:
        raise InvalidArgument("temperature", "must be between 0 and 2")
    if p.top_p is not None and not 0.0 < p.top_p <= 1.0:
        raise InvalidArgument("top_p", "must be in (0, 1]")
    if p.max_tokens is not None and p.max_tokens < 1:
        raise InvalidArgument("max_tokens", "must be at least 1")
    if len(p.stop) > MAX_STOP_SEQUENCES:
        raise InvalidArgument("stop", f"at most {MAX_STOP_SEQUENCES} stop sequences")
