"""grpc-router: route a conversation to the policy and LLM that should answer it."""

from grpc_router.errors import (
    EngineUnavailable,
    InvalidArgument,
    Overloaded,
    RouterError,
)
from grpc_router.types import (
    OTHER_ROUTE,
    Decision,
    Engine,
    Message,
    Role,
    RouteOutcome,
    RouteRequest,
    RouteSpec,
)

__all__ = [
    "OTHER_ROUTE",
    "Decision",
    "Engine",
    "EngineUnavailable",
    "InvalidArgument",
    "Message",
    "Overloaded",
    "Role",
    "RouteOutcome",
    "RouteRequest",
    "RouteSpec",
    "RouterError",
]
__version__ = "0.1.0"
