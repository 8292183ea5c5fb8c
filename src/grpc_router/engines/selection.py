"""Engine selection: turn the YAML `engine:` section into an Engine (built, not started).

Relative artifact paths resolve against `base_dir` (the config file's directory) when the path
exists there, else against the current directory (the repository root under `make serve`).
"""

from __future__ import annotations

from pathlib import Path

import structlog

from grpc_router.engines.arch_router.engine import ArchRouterEngine
from grpc_router.engines.artifact import resolve_variant_dir
from grpc_router.engines.cascade import CascadeEngine
from grpc_router.engines.encoder.engine import EncoderEngine
from grpc_router.errors import ArtifactError
from grpc_router.settings.engines import EngineConfig
from grpc_router.types import Engine

log = structlog.get_logger(__name__)


def resolve_path(path: Path, base_dir: Path) -> Path:
    """`path` if absolute; else base_dir/path when that exists; else relative to the CWD."""
    path = path.expanduser()
    if path.is_absolute():
        return path
    beside = base_dir / path
    return beside if beside.exists() else Path.cwd() / path


def artifact_present(root: Path, variant: str | None) -> bool:
    """Whether `root` holds a completed variant (the hashes are checked when it loads)."""
    try:
        resolve_variant_dir(root, variant)
    except ArtifactError:
        return False
    return True


def build_engine(cfg: EngineConfig, *, base_dir: Path) -> Engine:
    """Build (not start) the engine `cfg` selects."""
    arch = resolve_path(cfg.arch_router_artifact, base_dir)
    enc = resolve_path(cfg.encoder_artifact, base_dir)
    kind = cfg.kind
    if kind == "auto":
        if artifact_present(arch, cfg.arch_router.variant):
            kind = "arch-router"
            log.info("engine auto: serving Arch-Router", artifact=str(arch))
        else:
            kind = "encoder"
            log.warning(
                "engine auto: no Arch-Router artifact, serving the embedded encoder "
                "(all-MiniLM-L6-v2). Run `make export` to build Arch-Router-1.5B "
                "(needs the Hugging Face hub) and restart to serve it.",
                missing=str(arch),
                encoder_artifact=str(enc),
            )
    if kind == "arch-router":
        return ArchRouterEngine(arch, cfg.arch_router)
    if kind == "encoder":
        return EncoderEngine(enc, cfg.encoder)
    return CascadeEngine(
        EncoderEngine(enc, cfg.encoder),
        ArchRouterEngine(arch, cfg.arch_router),
        cfg.cascade_margin,
    )
