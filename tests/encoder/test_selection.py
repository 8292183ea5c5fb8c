"""Engine selection from the YAML `engine:` section, and the cascade on real engines (MiniLM in
front of a tiny Arch-Router)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from grpc_router.engines.arch_router.engine import ArchRouterEngine
from grpc_router.engines.cascade import CascadeEngine, probability_margin
from grpc_router.engines.encoder.engine import EncoderEngine
from grpc_router.engines.selection import build_engine, resolve_path
from grpc_router.settings import EngineConfig
from grpc_router.types import OTHER_ROUTE, Message, Role, RouteSpec

ROUTES = (
    RouteSpec("weather", "Weather forecasts: rain, temperature, wind, snow."),
    RouteSpec("music", "Music: play a song, search for songs, next track."),
)
RAIN = [Message(Role.USER, "will it rain in Boston tomorrow?")]


def test_auto_serves_encoder_without_arch_router(
    tmp_path: Path, encoder_artifact: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = EngineConfig(arch_router_artifact=tmp_path / "missing", encoder_artifact=encoder_artifact)
    engine = build_engine(cfg, base_dir=tmp_path)
    assert isinstance(engine, EncoderEngine)
    assert "make export" in capsys.readouterr().out


def test_auto_prefers_arch_router(tiny_artifacts: Path, encoder_artifact: Path) -> None:
    cfg = EngineConfig(arch_router_artifact=tiny_artifacts, encoder_artifact=encoder_artifact)
    assert isinstance(build_engine(cfg, base_dir=Path.cwd()), ArchRouterEngine)


def test_explicit_kinds(tiny_artifacts: Path, encoder_artifact: Path, tmp_path: Path) -> None:
    paths = {"arch_router_artifact": tiny_artifacts, "encoder_artifact": encoder_artifact}
    assert isinstance(build_engine(EngineConfig(kind="encoder", **paths), base_dir=tmp_path),
                      EncoderEngine)  # fmt: skip
    arch = build_engine(EngineConfig(kind="arch-router", **paths), base_dir=tmp_path)
    assert isinstance(arch, ArchRouterEngine)
    cascade = build_engine(
        EngineConfig(kind="cascade", cascade_margin=0.3, **paths), base_dir=tmp_path
    )
    assert isinstance(cascade, CascadeEngine) and cascade.margin == 0.3
    assert cascade.fast.name == "encoder" and cascade.slow.name == "arch-router"


def test_relative_paths(tmp_path: Path, encoder_artifact: Path) -> None:
    shutil.copytree(encoder_artifact, tmp_path / "models" / "minilm")
    assert resolve_path(Path("models/minilm"), tmp_path) == tmp_path / "models" / "minilm"
    assert resolve_path(Path("artifacts/x"), tmp_path) == Path.cwd() / "artifacts" / "x"
    assert resolve_path(encoder_artifact, tmp_path) == encoder_artifact


def test_config_is_strict() -> None:
    with pytest.raises(ValidationError, match="kind"):
        EngineConfig.model_validate({"kind": "gpt"})
    with pytest.raises(ValidationError, match="cascade_mragin"):
        EngineConfig.model_validate({"cascade_mragin": 0.2})
    with pytest.raises(ValidationError, match="temprature"):
        EngineConfig.model_validate({"encoder": {"temprature": 0.1}})
    cfg = EngineConfig.model_validate(
        {"kind": "encoder", "encoder": {"other_threshold": None, "variant": "fp32"}}
    )
    assert cfg.encoder.other_threshold is None and cfg.encoder.variant == "fp32"


def test_probability_margin() -> None:
    assert probability_margin({"a": 0.7, "b": 0.2, OTHER_ROUTE: 0.1}) == pytest.approx(0.5)
    assert probability_margin({"a": 1.0}) == 1.0


@pytest.mark.parametrize(("margin", "decider"), [(0.0, "encoder"), (1.0, "arch-router")])
def test_cascade_says_who_decided(
    tiny_artifacts: Path, encoder_artifact: Path, margin: float, decider: str
) -> None:
    cascade = CascadeEngine(
        EncoderEngine(encoder_artifact), ArchRouterEngine(tiny_artifacts), margin
    )

    async def run() -> None:
        await cascade.start()
        assert cascade.ready
        try:
            d = await cascade.decide(RAIN, ROUTES)
            assert d.engine == decider
            assert sum(d.scores.values()) == pytest.approx(1.0, abs=1e-3)
            assert "cascade_fast" in d.timings_ms
            assert ("cascade_slow" in d.timings_ms) == (decider == "arch-router")
            if decider == "encoder":
                assert d.route == "weather"
        finally:
            await cascade.close()

    asyncio.run(run())
