"""Plain typed objects shared by the engines, the service and dispatch.

Nothing here knows about gRPC, ONNX or HTTP: the servicer translates protobuf into these,
the engines decide on them, dispatch forwards them.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable

# The route every engine may answer when no configured route fits (Arch-Router's contract).
OTHER_ROUTE = "other"


class FallbackReason(StrEnum):
    """Why a call was answered with the default route instead of the engine's choice."""

    NONE = ""
    OTHER = "other"
    """The engine answered `other`: no route fits."""
    BELOW_THRESHOLD = "below_threshold"
    ENGINE_ERROR = "engine_error"
    ENGINE_TIMEOUT = "engine_timeout"
    OVERLOADED = "overloaded"
    UNKNOWN_ROUTE = "unknown_route"
    """The engine chose a route the configuration does not map to models."""

    @property
    def engine_failed(self) -> bool:
        """True when the engine failed (rather than chose the default route)."""
        return self in _ENGINE_FAILURES


class Role(StrEnum):
    USER = "user"
    ASSISTANT = "assistant"
    SYSTEM = "system"
    DEVELOPER = "developer"
    TOOL = "tool"


class MessageKind(StrEnum):
    """What a message carries. Agent harnesses interleave tool traffic with the user's turns;
    routing reads only text, and only up to the latest real user turn."""

    TEXT = "text"
    TOOL_CALL = "tool_call"
    """An assistant turn that only calls tools (its text, if any, is the call)."""
    TOOL_RESULT = "tool_result"
    """A tool's answer, whatever role the wire format gave it (Anthropic sends it as user)."""


@dataclass(frozen=True, slots=True)
class Message:
    role: Role
    content: str
    kind: MessageKind = MessageKind.TEXT


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """A route as the engines see it: a name and a plain-language description."""

    name: str
    description: str
    # Optional example utterances (used by the encoder engine; Arch-Router ignores them).
    examples: tuple[str, ...] = ()


def route_set_key(routes: Sequence[RouteSpec]) -> str:
    """Stable hash of a route set: names, descriptions, examples and their order. Caches of
    anything derived from a route set (prompt prefixes, embeddings, decisions) key by it.

    Every decision asks for it (the router and the engine both), so recent sets are remembered:
    hashing a tuple of RouteSpecs is cheap, serialising hundreds of examples is not."""
    return _route_set_key(tuple(routes))


@functools.lru_cache(maxsize=64)
def _route_set_key(routes: tuple[RouteSpec, ...]) -> str:
    payload = json.dumps([[r.name, r.description, list(r.examples)] for r in routes])
    return hashlib.sha256(payload.encode()).hexdigest()


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
    session_id: str = ""
    """The caller's conversation or agent-run id; empty routes the call on its own."""


class DecisionSource(StrEnum):
    """Where a call's decision came from."""

    ENGINE = "engine"
    """The engine ran on this call."""
    CACHE = "cache"
    """The same routing-relevant conversation was decided before: no model run."""
    SESSION = "session"
    """The session's route, without a model run (a tool step, or a pinned session)."""


class SessionStatus(StrEnum):
    NONE = ""
    """No session id, or sessions are off."""
    NEW = "new"
    CONTINUED = "continued"
    EXPIRED = "expired"
    """The id was known but its session had expired (or been evicted): it started afresh."""


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
    fallback_reason: FallbackReason = FallbackReason.NONE
    fallback_detail: str = ""
    """Why the engine failed, for operators (never message content); empty otherwise."""
    timings_ms: Mapping[str, float] = field(default_factory=dict)
    decision: Decision | None = None
    """The engine's raw decision; None when the engine failed and the router failed open."""
    engine_route: str = ""
    """What the engine answered for this conversation before any fallback or session policy
    ("other" included), from this call's run or the decision cache; empty when the session
    answered without a model run, or the engine failed. With `pinned`, the counterfactual."""
    source: DecisionSource = DecisionSource.ENGINE
    session_status: SessionStatus = SessionStatus.NONE
    pinned: bool = False
    """The session's route was kept although the engine preferred `engine_route`, or no model
    ran because the session answered."""
    switched: bool = False
    """This turn moved the session to a new route."""


_ENGINE_FAILURES = frozenset(
    {FallbackReason.ENGINE_ERROR, FallbackReason.ENGINE_TIMEOUT, FallbackReason.OVERLOADED}
)
