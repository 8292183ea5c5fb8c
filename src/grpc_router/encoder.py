"""The encoder engine: zero-shot routing by sentence-embedding similarity (all-MiniLM-L6-v2)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class EncoderSettings(BaseModel):
    """The YAML `engine.encoder:` section."""

    model_config = ConfigDict(extra="forbid")

    variant: str = "int8"
    """Artifact variant directory to load (int8 or fp32)."""
    threads: int = Field(default=2, ge=1)
    """onnxruntime intra-op threads."""
    max_length: int = Field(default=128, ge=8, le=512)
    """Token cap per embedded text."""
    other_threshold: float | None = None
    """Best-route similarity below which the engine answers `other`; None uses the calibrated
    value stored with the artifact."""
