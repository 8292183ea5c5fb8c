"""structlog JSON logging, one object per line, with per-call fields carried in a context var."""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS["error"] = logging.ERROR

# Fields the handler of the current call adds to its one summary line.
_call_fields: ContextVar[dict[str, Any] | None] = ContextVar("grpc_router_call", default=None)


def configure(level: str = "info") -> None:
    """JSON lines on stdout. Safe to call again (e.g. on reload with a new level)."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str = "grpc_router") -> Any:
    return structlog.get_logger(name)


def start_call(request_id: str) -> dict[str, Any]:
    """Begin a call's context: every log line in it carries `request_id`."""
    fields: dict[str, Any] = {}
    _call_fields.set(fields)
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    return fields


def set_request_id(request_id: str) -> None:
    """Replace the call's request id (the request body's id wins over metadata)."""
    structlog.contextvars.bind_contextvars(request_id=request_id)


def current_request_id() -> str:
    return str(structlog.contextvars.get_contextvars().get("request_id", ""))


def annotate(**fields: Any) -> None:
    """Add fields to the current call's summary line (no-op outside a call)."""
    current = _call_fields.get()
    if current is not None:
        current.update(fields)
