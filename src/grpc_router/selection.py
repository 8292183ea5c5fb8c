"""Engine selection: turn the YAML `engine:` section into a running Engine."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from grpc_router.encoder import EncoderSettings
from grpc_router.types import Engine

EngineKind = Literal["auto", "arch-router", "encoder", "cascade"]


class EngineConfig(BaseModel):
    """The YAML `engine:` section. Relative artifact paths resolve against `base_dir`."""

    model_config = ConfigDict(extra="forbid")

    kind: EngineKind = "auto"
    arch_router_artifact: Path = Path("artifacts/arch-router-1.5b")
    encoder_artifact: Path = Path("artifacts/minilm")
    encoder: EncoderSettings = Field(default_factory=EncoderSettings)
    cascade_margin: float = Field(default=0.1, ge=0.0, le=1.0)


def build_engine(cfg: EngineConfig, *, base_dir: Path) -> Engine:
    """Build (not start) the engine `cfg` selects."""
    raise NotImplementedError
