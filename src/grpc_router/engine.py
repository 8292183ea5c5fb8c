"""The Arch-Router engine: a conversation and a route set in, a Decision out.

It glues the prompt renderer, the onnxruntime session, the prefix KV cache, the constrained
decoder and the dynamic batcher together. It knows nothing about gRPC.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field

from grpc_router.errors import EngineUnavailable
from grpc_router.types import Decision, Message, RouteSpec

log = structlog.get_logger(__name__)

Provider = Literal["auto", "tensorrt", "cuda", "cpu"]


class ArchRouterSettings(BaseModel):
    """Tuning knobs of the Arch-Router engine; every field has a safe default."""

    model_config = ConfigDict(extra="forbid")

    provider: Provider = Field(
        default="auto",
        description="Execution provider: auto tries TensorRT, then CUDA, then CPU.",
    )
    intra_op_threads: int | None = Field(
        default=None,
        ge=0,
        description="Threads inside one ORT operator; None = onnxruntime's default "
        "(one per physical core).",
    )
    inter_op_threads: int | None = Field(
        default=None,
        ge=0,
        description="Threads across independent operators; None = onnxruntime's default (1, "
        "since the graph runs sequentially).",
    )
    max_batch_size: int = Field(
        default=4, ge=1, description="Most requests coalesced into one model run."
    )
    max_wait_us: int = Field(
        default=2000,
        ge=0,
        description="How long the first request of a batch waits for others, in microseconds.",
    )
    max_queue: int = Field(
        default=64, ge=1, description="Requests waiting beyond this are rejected with Overloaded."
    )
    prompt_token_budget: int = Field(
        default=2048,
        ge=64,
        description="Most prompt tokens; the oldest turns are dropped first, the latest user "
        "turn is kept (truncated if it alone is too long).",
    )
    prefix_cache_bytes: int = Field(
        default=512 * 1024 * 1024,
        ge=0,
        description="Bound of the per-route-set prefix KV cache in bytes; 0 disables it.",
    )
    full_scores: bool = Field(
        default=True,
        description="Score every route plus 'other' by default (a request may turn it off).",
    )
    trt_cache_dir: Path | None = Field(
        default=None,
        description="TensorRT engine cache directory; None = <artifact>/trt-cache.",
    )
    warmup: bool = Field(
        default=True, description="Run one decision at start so the first is not slow."
    )
    variant: str | None = Field(
        default=None,
        description="Artifact variant (int8, int4, fp16, fp32); None = the default one.",
    )


class ArchRouterEngine:
    """Routes with Arch-Router-1.5B exported to ONNX, run on onnxruntime."""

    def __init__(self, artifact: Path, settings: ArchRouterSettings | None = None) -> None:
        self._artifact = Path(artifact)
        self._settings = settings or ArchRouterSettings()
        self._ready = False
        self._lock = asyncio.Lock()

    @property
    def name(self) -> str:
        return "arch-router"

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def settings(self) -> ArchRouterSettings:
        return self._settings

    async def start(self) -> None:
        raise EngineUnavailable("arch-router engine: not implemented yet")

    async def decide(
        self,
        messages: Sequence[Message],
        routes: Sequence[RouteSpec],
        *,
        full_scores: bool = True,
    ) -> Decision:
        raise EngineUnavailable("arch-router engine is not started")

    async def close(self) -> None:
        self._ready = False
