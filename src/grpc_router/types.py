"""Plain typed objects shared by the engines, the service and dispatch.

Nothing here knows about gRPC, ONNX or HTTP: the servicer translates protobuf into these,
the engines decide on them, dispatch forwards them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable

# The route every engine may answer when no configured route fits (Arch-Router's contract).
OTHER_ROUTE = "other"


class Role(StrEnum):
    USER = "user"
    ASSISTANT = "assistant"
    SYSTEM = "system"
    DEVELOPER = "developer"
    TOOL = "tool"


@dataclass(frozen=True, slots=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """A route as the engines see it: a name and a plain-language description."""

    name: str
    description: str
    # Optional example utterances (used by the encoder engine; Arch-Router ignores them).
    examples: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Decision:
    """What an engine decided for one conversation."""

    route: str
    """A configured route name, or OTHER_ROUTE."""
    confidence: float
    """Probability of `route` in [0, 1]."""
    scores: Mapping[str, float] = field(default_factory=dict)
    """Probability of every route plus OTHER_ROUTE, summing to 1; empty when scores were off."""
    engine: str = ""
    """Which engine decided: "arch-router" or "encoder"."""
    timings_ms: Mapping[str, float] = field(default_factory=dict)
    """Server-side phases in milliseconds, e.g. queue, prefill, decode, total."""
    prompt_tokens: int = 0
    cached_tokens: int = 0


@runtime_checkable
class Engine(Protocol):
    """A routing engine. Implementations are asyncio-safe and own their worker threads."""

    @property
    def name(self) -> str: ...

    @property
    def ready(self) -> bool:
        """True once loaded and warmed up."""
        ...

    async def start(self) -> None:
        """Load the model and warm it up; idempotent."""
        ...

    async def decide(
        self,
        messages: Sequence[Message],
        routes: Sequence[RouteSpec],
        *,
        full_scores: bool = True,
    ) -> Decision:
        """Decide the route. Raises InvalidArgument, Overloaded or EngineUnavailable."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """One routing call as the transports hand it to the core router."""

    messages: tuple[Message, ...]
    routes: tuple[RouteSpec, ...] | None = None
    """Per-request route set overriding the configured one; None uses the config's."""
    request_id: str = ""
    full_scores: bool = True


@dataclass(frozen=True, slots=True)
class RouteOutcome:
    """The core router's answer: the decision mapped onto the configured models."""

    route: str
    model: str
    """The preferred model of `route` (the default model for OTHER_ROUTE or a fallback)."""
    confidence: float
    scores: Mapping[str, float]
    engine: str
    fallback_used: bool = False
    fallback_reason: str = ""
    """Empty, or one of: "other", "below_threshold", "engine_error", "engine_timeout",
    "overloaded", "unknown_route"."""
    fallback_detail: str = ""
    """Why the engine failed, for operators (never message content); empty otherwise."""
    timings_ms: Mapping[str, float] = field(default_factory=dict)
    decision: Decision | None = None
    """The engine's raw decision; None when the engine failed and the router failed open."""
