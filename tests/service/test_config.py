"""The shipped example config and config-loading rules (no server needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from grpc_router.settings import ConfigError, load_config
from tests.service.conftest import REPO


def test_example_config_is_valid_and_realistic() -> None:
    cfg = load_config(REPO / "examples" / "routes.yaml")
    names = [r.name for r in cfg.routes]
    for expected in (
        "code_generation",
        "debugging",
        "summarization",
        "translation",
        "general_chat",
    ):
        assert expected in names
    assert cfg.default_route in names
    assert cfg.engine.kind == "auto"
    assert not cfg.logging.log_content
    assert cfg.server.tls is None and cfg.server.host == "127.0.0.1"
    # Keys come from the environment, never the file.
    text = (REPO / "examples" / "routes.yaml").read_text()
    assert "sk-" not in text
    assert all(m.api_key_env is None or m.api_key_env.isupper() for m in cfg.models.values())


def test_base_url_env_expansion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "routes: [{name: chat, description: anything, models: [m]}]\n"
        "models:\n"
        "  m: {base_url: '${ROUTER_TEST_URL:-http://127.0.0.1:1/v1}', model: x}\n"
        "  n: {base_url: '${ROUTER_TEST_UNSET_VAR}', model: y}\n"
        "default_route: chat\ndefault_model: m\n"
    )
    monkeypatch.delenv("ROUTER_TEST_UNSET_VAR", raising=False)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "models.n.base_url" in str(err.value)
    assert "ROUTER_TEST_UNSET_VAR is not set" in str(err.value)
    monkeypatch.setenv("ROUTER_TEST_UNSET_VAR", "https://llm.internal/v1")
    monkeypatch.setenv("ROUTER_TEST_URL", "https://other.internal/v1")
    cfg = load_config(path)
    assert cfg.models["m"].base_url == "https://other.internal/v1"
    assert cfg.models["n"].base_url == "https://llm.internal/v1"
    assert cfg.model_chain("chat") == ["m"]
    assert cfg.model_chain("unknown_route") == ["m"]


def test_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}: (top level): expected a mapping" in str(err.value)
