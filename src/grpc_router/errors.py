"""Errors with a meaning the transport can map to a status code."""

from __future__ import annotations


class RouterError(Exception):
    """Base of every error grpc-router raises on purpose."""


class InvalidArgument(RouterError):
    """A request or config field is wrong; `field` names it (dotted path)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class Overloaded(RouterError):
    """The engine's queue is full; the caller should back off and retry."""


class EngineUnavailable(RouterError):
    """The engine is not loaded, failed, or timed out."""


class ArtifactError(RouterError):
    """A model artifact is missing, incomplete or fails its manifest hashes."""


class UpstreamError(RouterError):
    """Every model a request could be dispatched to failed."""
