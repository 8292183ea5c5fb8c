"""The full-shape fixture: Arch-Router-1.5B's exact config with random weights (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grpc_router.engines.artifact import load_artifact, resolve_variant_dir
from tests.fixtures.checkpoints import ARCH_ROUTER_CONFIG, ensure_full_shape_artifact


@pytest.mark.slow
def test_one_layer_full_width_exports_with_arch_router_shapes(tmp_path: Path) -> None:
    root = ensure_full_shape_artifact(tmp_path, layers=1, variants="int8")
    manifest = load_artifact(resolve_variant_dir(root, None))
    assert manifest.variant == "int8"
    config = json.loads((root / "int8" / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"):
        assert config[key] == ARCH_ROUTER_CONFIG[key], key
    assert config["num_hidden_layers"] == 1
    assert (manifest.extra["num_key_value_heads"], manifest.extra["head_dim"]) == (2, 128)
    assert manifest.parity["checked"] and manifest.parity["prompts"] >= 4
