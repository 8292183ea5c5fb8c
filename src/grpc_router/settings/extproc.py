"""The `ext_proc:` section: how the Envoy External Processing servicer reads and answers."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
    session_header: str = "x-session-id"
    """Request header whose value is the call's session id (see the `session:` section); an
    absent or empty header routes the call on its own. Hash the mesh on the same header so that
    a session's calls reach the replica that holds it (docs/deploy.md)."""
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
    """OpenAI Chat Completions paths."""
    anthropic_paths: tuple[str, ...] = ("/v1/messages",)
    """Anthropic Messages paths."""
    responses_paths: tuple[str, ...] = ("/v1/responses",)
    """OpenAI Responses API paths."""
    strip_client_headers: bool = True
    """Remove the router's headers when a client sent them itself, so that a caller cannot
    pick the upstream by setting `x-router-model` (the only change made to a pass-through)."""
    skip_unused_phases: bool = True
    """Ask Envoy (mode_override; needs `allow_mode_override: true`) not to send the body or the
    response phases of a request that will pass through."""

    @field_validator(
        "route_header", "model_header", "confidence_header", "fallback_header", "session_header"
    )
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
        if self.session_header in names:
            raise ValueError(
                f"session_header {self.session_header!r} is one of the router's own headers"
            )
        lists = {
            "openai_paths": self.openai_paths,
            "anthropic_paths": self.anthropic_paths,
            "responses_paths": self.responses_paths,
        }
        seen: dict[str, str] = {}
        for key, paths in lists.items():
            for path in paths:
                if path in seen and seen[path] != key:
                    raise ValueError(f"{path!r} listed as both {seen[path]} and {key}")
                seen[path] = key
        return self

    @field_validator("openai_paths", "anthropic_paths", "responses_paths")
    @classmethod
    def _paths(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for path in value:
            if not path.startswith("/") or "?" in path:
                raise ValueError(f"{path!r}: a path starts with '/' and has no query")
        return value
